"""LoRA on the engine (no vLLM): PEFT adapters of three ranks mixed in one step against
transformers+peft, refusals naming the field, and no compile when adapters change."""

import json

import numpy as np
import pytest

from tests.helpers import (ENGINE_BLOCK, RecordedProgram, engine_request, run_chunks,
                           save_tiny_family, save_tiny_gemma3, save_tiny_llama)
from tests.lora.lora_helpers import ADAPTERS, peft_logits, save_adapter, save_adapters
from xla_inference.lora.peft import LoraError, load_adapter

PROMPTS = [[5, 9, 17, 33, 2, 71, 8], [3, 44, 12, 90, 61, 7, 7, 19, 100], [120, 4, 4, 56, 13],
           [8, 77, 31, 2, 9, 64]]


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def model_and_adapters(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = {"llama": save_tiny_llama, "gemma3": save_tiny_gemma3}.get(
        request.param, lambda path: save_tiny_family(path, request.param))(root / "model")
    return model_dir, save_adapters(model_dir, root)


@pytest.fixture(scope="module")
def llama_targets(tmp_path_factory):
    """A tiny Llama's targetable modules and three adapters for it (host side only)."""
    import jax.numpy as jnp

    from xla_inference.lora.slots import decoder_targets
    from xla_inference.runner.build import Precision, load

    root = tmp_path_factory.mktemp("llama_host")
    model_dir = save_tiny_llama(root / "model")
    f32 = jnp.dtype(jnp.float32)
    return model_dir, decoder_targets(load(model_dir, Precision(f32, f32, f32)).params), \
        save_adapters(model_dir, root)


def lora_engine(model_dir, max_loras=3, max_rank=16, max_cpu_loras=4, max_num_tokens=64,
                mesh=None, quantization=None, target_modules=None):
    import jax.numpy as jnp

    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    f32 = jnp.dtype(jnp.float32)
    model = load(model_dir, Precision(f32, f32, f32), quantization=quantization)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=max_num_tokens,
                        max_num_seqs=8, max_model_len=128)
    return build_engine(model, ecfg, mesh=mesh, lora=dict(max_loras=max_loras, max_rank=max_rank,
                                                          max_cpu_loras=max_cpu_loras,
                                                          target_modules=target_modules))


def add(engine, lora_id, path):
    engine.lora.add(lora_id, load_adapter(path, engine.lora.module_shapes, engine.lora.max_rank,
                                          target_modules=engine.lora.target_modules))


def test_mixed_adapters_match_peft(model_and_adapters):
    """Base and three adapters in the same steps (prompts in two chunks): every position's
    logits within 2e-4 of transformers+peft for its own adapter."""
    model_dir, adapters = model_and_adapters
    _assert_mixed_adapters_match_peft(lora_engine(model_dir), model_dir, adapters)


def test_tensor_parallel_2_matches_peft(llama_targets):
    """TP 2 on virtual devices: the stacks split as their base weights (B by output for
    q/k/v/gate/up, A by input for o/down), the mixed batch still within 2e-4 of
    transformers+peft, and a slot rewritten in place keeps its split."""
    from xla_inference.parallel.sharding import build_mesh

    model_dir, _, adapters = llama_targets
    engine = lora_engine(model_dir, mesh=build_mesh(2))
    stacks = engine.lora.stacks
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    assert tuple(stacks["b"][q].sharding.spec)[:1] == ("model",)
    assert tuple(stacks["a"]["model.layers.0.mlp.down_proj"].sharding.spec)[2:] == ("model",)
    halves = {s.data.shape for s in stacks["b"][q].addressable_shards}
    assert halves == {(stacks["b"][q].shape[0] // 2, stacks["b"][q].shape[1])}
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters)
    assert tuple(engine.lora.stacks["a"][down].sharding.spec)[2:] == ("model",)


def test_data_parallel_2_matches_peft(llama_targets):
    """DP 2 on virtual devices: each replica runs its own requests with its own tokens'
    slots over one shared set of slots (max_loras per replica, so 2 x 2 here), both
    replicas mixing base and adapters in one step, within 2e-4 of transformers+peft."""
    from xla_inference.parallel.sharding import build_mesh

    model_dir, _, adapters = llama_targets
    engine = lora_engine(model_dir, max_loras=2, mesh=build_mesh(1, 2))
    assert engine.replicas == 2 and engine.lora.max_loras == 4
    # Pages 1.. belong to replica 0, pages 32.. to replica 1 (64 pages, 32 per replica).
    _assert_mixed_adapters_match_peft(engine, model_dir, adapters, first_blocks=[1, 33, 9, 41])
    assert engine.rows_per_replica.min() > 0


def _assert_mixed_adapters_match_peft(engine, model_dir, adapters, first_blocks=None, atol=2e-4):
    paths = [None, *adapters.values()]
    for i, path in enumerate(paths[1:], start=1):
        add(engine, i, path)
    first_blocks = first_blocks or [1 + 8 * i for i in range(len(PROMPTS))]
    reqs = [engine_request(f"r{i}", p, first) for i, (p, first) in enumerate(zip(PROMPTS,
                                                                               first_blocks))]
    for i, req in enumerate(reqs):
        req.lora_id = i
    plan = [{i: 3 for i in range(4)}] + [{i: 1} for i in range(4) for _ in range(len(PROMPTS[i]) - 3)]
    rows = run_chunks(engine, reqs, plan)
    for i, (prompt, path) in enumerate(zip(PROMPTS, paths)):
        want = peft_logits(model_dir, path, prompt)
        for pos in range(2, len(prompt)):
            np.testing.assert_allclose(rows[(f"r{i}", pos)], want[pos], atol=atol, rtol=0,
                                       err_msg=f"adapter {path} position {pos}")
    assert np.abs(peft_logits(model_dir, paths[1], PROMPTS[0]) - peft_logits(
        model_dir, None, PROMPTS[0])).max() > 1e-2  # the adapters matter


@pytest.mark.slow  # compiles every bucket (warm-up)
def test_swaps_and_evictions_do_not_compile(llama_targets):
    """Two slots, three adapters: loading, evicting and reloading write slots in place; a
    step without adapters runs the base program (compiled at warm-up too)."""
    from xla_inference.runner import compile_counter

    model_dir, _, adapters = llama_targets
    engine = lora_engine(model_dir, max_loras=2, max_cpu_loras=3, max_num_tokens=16)
    engine.warm_up()
    before = compile_counter.num_compilations()
    for i, path in enumerate(adapters.values(), start=1):
        add(engine, i, path)
    programs = {"lora": engine._forward, "base": engine._forward_base}
    ran = []
    for name, program in programs.items():
        setattr(engine, f"_forward{'_base' if name == 'base' else ''}",
                RecordedProgram(program, lambda args, name=name: ran.append(name)))
    order = [(1, 2), (3, 0), (0, 0), (2, 3), (1, 3), (0, 1)]
    for step, ids in enumerate(order):
        reqs = [engine_request(f"s{step}{j}", PROMPTS[j], 1 + 8 * j) for j in range(2)]
        for req, lora_id in zip(reqs, ids):
            req.lora_id = lora_id
        rows = run_chunks(engine, reqs, [{0: len(PROMPTS[0]), 1: len(PROMPTS[1])}])
        for j, (req, lora_id) in enumerate(zip(reqs, ids)):
            path = None if lora_id == 0 else list(adapters.values())[lora_id - 1]
            np.testing.assert_allclose(rows[(req.req_id, len(PROMPTS[j]) - 1)],
                                       peft_logits(model_dir, path, PROMPTS[j])[-1], atol=2e-4,
                                       rtol=0, err_msg=f"step {step} adapter {lora_id}")
    assert ran == ["base" if ids == (0, 0) else "lora" for ids in order]
    assert engine.lora.slot_writes >= 5  # evictions happened
    engine.lora.remove(2)
    assert engine.lora.ids() == {1, 3}
    assert compile_counter.num_compilations() == before


def test_pinned_adapter_is_not_evicted(llama_targets):
    import jax.numpy as jnp

    from xla_inference.lora.slots import LoraSlots

    _, shapes, adapters = llama_targets
    slots = LoraSlots(shapes, max_loras=1, max_rank=16, max_cpu_loras=3, dtype=jnp.float32)
    for lora_id, path in enumerate(adapters.values(), start=1):
        slots.add(lora_id, load_adapter(path, shapes, 16))
    slots.slots_for([1])
    assert slots.pin(1)
    with pytest.raises(LoraError, match="pinned or in use"):
        slots.slots_for([2])
    with pytest.raises(LoraError, match="--max-loras"):
        slots.slots_for([1, 2])
    assert slots.remove(1) and slots.slots_for([2]) == {0: 0, 2: 1}


@pytest.mark.parametrize("edit, field", [
    (dict(use_dora=True), "use_dora"),
    (dict(bias="all"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=32), "rank_pattern"),
])
def test_unsupported_configs_name_the_field(llama_targets, tmp_path, edit, field):
    _, shapes, adapters = llama_targets
    src = adapters["a4"]
    dst = tmp_path / "edited"
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(LoraError, match=field):
        load_adapter(dst, shapes, 16)


def test_rank_above_max_and_unserved_modules_refused(llama_targets, tmp_path):
    model_dir, shapes, adapters = llama_targets
    with pytest.raises(LoraError, match="max-lora-rank 8"):
        load_adapter(adapters["a16"], shapes, 8)
    # An LM head adapter is served (tests/lora/test_lora_vocab.py); one whose saved LM head
    # has rows for added tokens (a resized vocabulary) is not.
    head = save_adapter(model_dir, tmp_path / "head", seed=3, r=4, target_modules=["lm_head"])
    assert "lm_head" in load_adapter(head, shapes, 16).weights
    _add_vocabulary_rows(head / "adapter_model.safetensors", "lm_head.base_layer.weight")
    with pytest.raises(LoraError, match="lm_head.*resize the vocabulary"):
        load_adapter(head, shapes, 16)
    assert ADAPTERS[0][0] == "a4"


def _add_vocabulary_rows(weights_file, suffix: str) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(weights_file))
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = np.concatenate([tensors[key], tensors[key][:2]])
    save_file(tensors, str(weights_file))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_grouped_delta_matches_float64(dtype, num_tokens):
    """One projection of a q/k/v-like group, bfloat16 stacks against float32 activations as
    on the host CPU: base + each token's own slot's (x A^T) B^T, against float64 numpy on the
    same (rounded) weights, for tokens of every slot and none."""
    import jax.numpy as jnp

    from xla_inference.layers.linear import project
    from xla_inference.lora.slots import LoraWeight, column_mask

    rng = np.random.default_rng(0)
    L, r, D, G, out, member = 3, 4, 32, 3, 24, 1
    rounded = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)  # noqa: E731
    base = rounded(rng.normal(size=(out, D)))
    a = rounded(rng.normal(size=(G, L * r, D)))
    b = rounded(rng.normal(size=(out, L * r)))
    x = rng.normal(size=(num_tokens, D)).astype(np.float32)
    slots = (np.arange(num_tokens, dtype=np.int32) + 2) % (L + 1)  # 2, 3, 0, 1, 2
    w = LoraWeight(jnp.asarray(base, dtype), jnp.asarray(a.reshape(G * L * r, D), dtype),
                   jnp.asarray(b, dtype), jnp.asarray(b.T, jnp.float32),
                   column_mask(jnp.asarray(slots), L, r), member)
    got = np.asarray(project(jnp.asarray(x), w), np.float64)
    xr = rounded(x)
    want = xr @ base.T
    for t, s in enumerate(slots):
        if s:
            cols = slice((s - 1) * r, s * r)
            xa = rounded(xr[t] @ a[member, cols].T)  # the shrink's output is rounded too
            want[t] += xa @ b[:, cols].T
    np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == "bfloat16" else 1e-5,
                               atol=2e-2 if dtype == "bfloat16" else 1e-4)


def test_base_program_is_the_plain_engines(llama_targets):
    """A LoRA engine's program for steps without adapters lowers to the very module a plain
    engine (no --enable-lora) runs: such steps pay nothing for LoRA."""
    import jax.numpy as jnp

    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig
    from xla_inference.runner.requests import build_step_batch

    model_dir = llama_targets[0]
    ecfg = EngineConfig(num_blocks=16, block_size=ENGINE_BLOCK, max_num_tokens=16, max_num_seqs=4,
                        max_model_len=64)
    precision = Precision.for_platform(jnp.dtype(jnp.bfloat16), "cpu")
    plain = build_engine(load(model_dir, precision), ecfg)
    lora = build_engine(load(model_dir, precision), ecfg,
                        lora=dict(max_loras=2, max_rank=8, max_cpu_loras=2))
    batch = build_step_batch([], plain.layout_for(16))
    want = plain.lower_step(batch).as_text()
    assert lora._forward_base.jitted.lower(lora._param_leaves, lora.kv_cache, batch,
                                            np.asarray(False)).as_text() == want
    with_lora = lora.lower_step(batch, token_slots=np.zeros(16, np.int32)).as_text()
    assert with_lora != want  # the adapters' program is another one
