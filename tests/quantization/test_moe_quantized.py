"""Quantized MoE experts (quantization/experts.py): kept quantized in memory and multiplied
by a grouped product that dequantizes them inside the step.

- The stacked layout loses nothing (each expert's GroupQuant, dequantized in float64) and
  the grouped product equals float64 numpy over each of its paths (fewer rows than experts:
  each row through the native CPU kernel on its expert, or its expert gathered and
  dequantized; otherwise every expert dequantized for ragged_dot).
- Online int8 / fp8 of tiny Qwen3-MoE and Mixtral through the engine: the experts are
  quantized in memory (bytes asserted) and the logits over a ragged batch equal
  transformers on a checkpoint whose experts and projections hold their dequantized values;
  Llama 4's fused experts too.
- A GPTQ 4-bit Qwen3-MoE checkpoint (every linear, experts included, packed by
  tests/quantization/checkpoints.py's numpy) keeps its experts 4-bit and gives
  transformers' logits on the dequantized weights.
- Expert parallel over 4 virtual devices gives the one-device logits, the quantized
  experts split by expert.
- Through vllm.LLM (slow): online int8 and the GPTQ checkpoint of Qwen3-MoE give
  transformers' greedy tokens on the dequantized weights."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (ENGINE_BLOCK, assert_ragged_logits, engine_request, hf_logits,
                           run_chunks, save_tiny_family)
from tests.quantization.checkpoints import (_dequantize, _sym_quantize, gptq_pack_columns,
                                            gptq_pack_rows, read_tensors)
from tests.quantization.test_online import save_dequantized
from tests.quantization.test_packed import random_group_quant
from xla_inference.kernels import cpu_quantized
from xla_inference.quantization import experts as experts_module
from xla_inference.quantization.experts import (PackedExperts, dequantize_experts, pack_experts,
                                                quantize_experts, ragged_product,
                                                with_compute_dtype)
from xla_inference.quantization.groups import FP8, INT4, INT8, INT8_ACTIVATIONS, GroupQuant
from xla_inference.quantization.online import ONLINE_METHODS, quantize_per_channel
from xla_inference.quantization.packed import PackedWeight

TOL = 2e-3  # as tests/quantization/test_online.py: float32 on both sides
# A prefill, a chunked prefill with a one-token step (bucket 16: every expert dequantized),
# then one token alone (bucket 1: 2 rows < 8 experts, the gathered path).
PLAN = [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}, {0: 1}]
PROMPT_LENGTHS = (12, 23, 14)
E, IN, OUT = 6, 64, 40
KINDS = {  # name: (kind, group, offsets)
    "int4-g32-offsets": (INT4, 32, True),
    "int8-per-channel": (INT8, IN, False),
    "int8-g16-offsets": (INT8, 16, True),
    "fp8-per-channel": (FP8, IN, False),
}


def _experts(name: str) -> list[GroupQuant]:
    kind, group, offsets = KINDS[name]
    return [random_group_quant(kind, OUT, IN, group, offsets=offsets, seed=e) for e in range(E)]


@pytest.mark.parametrize("name", KINDS)
def test_stacked_experts_keep_every_value(name):
    quants = _experts(name)
    packed = pack_experts(quants)
    assert packed.shape == (E, IN, OUT)
    expected = np.stack([q.dequantize(np.float32).T for q in quants])
    np.testing.assert_array_equal(np.asarray(dequantize_experts(packed, jnp.float32)), expected)
    kind = KINDS[name][0]
    rows = OUT if kind == FP8 else 48  # integer tiles of 16 rows: 40 padded to 48
    assert packed.values.nbytes == E * IN * rows // (2 if kind == INT4 else 1)


def test_experts_with_different_group_sizes_share_the_finest():
    quants = [random_group_quant(INT4, OUT, IN, 32 if e % 2 else 64, seed=e) for e in range(E)]
    packed = pack_experts(quants)
    assert packed.group_size == 32
    expected = np.stack([q.dequantize(np.float32).T for q in quants])
    np.testing.assert_array_equal(np.asarray(dequantize_experts(packed, jnp.float32)), expected)


def test_experts_with_and_without_a_zero_point_share_one_layout():
    """Symmetric 4-bit experts (offsets -8 * scale, which packing may keep as a zero
    point) next to asymmetric ones (their own offsets): stacked, each keeps its values."""
    quants = [random_group_quant(INT4, OUT, IN, 32, seed=e) for e in range(E)]
    for q in quants[::2]:
        q.offsets = -8 * q.scales
    packed = pack_experts(quants)
    # float64: (q - z) * s and q * s + (-z * s) round differently in float32
    expected = np.stack([q.dequantize().T for q in quants])
    close = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dequantize_experts(packed, jnp.float32)), expected,
                               **close)
    symmetric = pack_experts(quants[::2])
    np.testing.assert_allclose(np.asarray(dequantize_experts(symmetric, jnp.float32)),
                               expected[::2], **close)


def _ragged_reference(xs, quants, group_sizes):
    """float64: row r times its expert's dequantized [out, in] weight."""
    experts = np.repeat(np.arange(len(quants)), group_sizes)
    return np.stack([quants[e].dequantize() @ x for x, e in zip(xs.astype(np.float64), experts)])


# 4 rows < E = 6: one expert a row (the native kernel on the CPU, for integer experts,
# or XLA on the gathered expert); 14 and 25 rows >= E: each expert's rows through the
# kernel, KERNEL_CHUNK = 8 at a time (19 rows: three chunks), or every expert dequantized
# for XLA's ragged_dot.
FEW, MANY, LONG_GROUP = (0, 2, 0, 1, 0, 1), (5, 0, 3, 2, 0, 4), (19, 0, 3, 0, 1, 2)
GROUPINGS = {"kernel-rows": FEW, "kernel-groups": MANY, "kernel-long-group": LONG_GROUP,
             "gathered": FEW, "every-expert": MANY, "every-expert-long-group": LONG_GROUP}


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("path", GROUPINGS)
def test_ragged_product_equals_float64(name, path, monkeypatch):
    if not path.startswith("kernel"):
        monkeypatch.setattr(experts_module, "_uses_kernel", lambda w: False)
    group_sizes = GROUPINGS[path]
    quants = _experts(name)
    packed = jax.tree.map(jnp.asarray, pack_experts(quants))
    rows = sum(group_sizes)
    xs = np.random.default_rng(1).standard_normal((rows, IN)).astype(np.float32)
    got = jax.jit(ragged_product)(jnp.asarray(xs), packed, jnp.asarray(group_sizes, jnp.int32))
    want = _ragged_reference(xs, quants, group_sizes)
    # The kernel rounds activations to 15 bits (quantization/product.py): ~1e-4 relative.
    np.testing.assert_allclose(np.asarray(got), want, rtol=5e-4, atol=5e-4 * np.abs(want).max())


@pytest.mark.parametrize("path", ["kernel-rows", "gathered", "kernel-groups"])
def test_rows_past_the_groups_come_out_zero(path, monkeypatch):
    """Rows past sum(group_sizes) (padding, other devices' pairs: layers/moe.py sorts them
    there) come out zero, as from ragged_dot: on the kernel's row path they are not run
    (a stand-in expert would give them its product); the grouped rows are unchanged."""
    if path == "gathered":
        monkeypatch.setattr(experts_module, "_uses_kernel", lambda w: False)
    elif not cpu_quantized.available():
        pytest.fail("the native CPU quantized kernel is not built")
    group_sizes = (0, 2, 0, 1, 0, 0) if path != "kernel-groups" else (5, 0, 3, 0, 0, 1)
    quants = _experts("int8-per-channel")
    packed = jax.tree.map(jnp.asarray, pack_experts(quants))
    rows = 5 if path != "kernel-groups" else 12  # 2 and 3 rows past the groups
    xs = np.random.default_rng(1).standard_normal((rows, IN)).astype(np.float32)
    got = np.asarray(jax.jit(ragged_product)(jnp.asarray(xs), packed,
                                             jnp.asarray(group_sizes, jnp.int32)))
    grouped = sum(group_sizes)
    want = _ragged_reference(xs[:grouped], quants, group_sizes)
    np.testing.assert_allclose(got[:grouped], want, rtol=5e-4, atol=5e-4 * np.abs(want).max())
    assert not got[grouped:].any()


def test_kernel_path_runs_where_the_kernel_is():
    packed = pack_experts(_experts("int4-g32-offsets"))
    assert experts_module._uses_kernel(packed) == cpu_quantized.available()
    assert not experts_module._uses_kernel(pack_experts(_experts("fp8-per-channel")))


@pytest.mark.parametrize("group_sizes", [FEW, MANY], ids=["few-rows", "many-rows"])
def test_int8_activation_experts_quantize_each_row(group_sizes):
    """W8A8 int8 experts (compressed-tensors' dynamic scheme): each input row rounded to
    int8 levels of its own scale (max |x| / 127) before the product."""
    quants = [random_group_quant(INT8, OUT, IN, IN, offsets=False, seed=e,
                                 activations=INT8_ACTIVATIONS) for e in range(E)]
    packed = jax.tree.map(jnp.asarray, pack_experts(quants))
    xs = np.random.default_rng(4).standard_normal((sum(group_sizes), IN)).astype(np.float32)
    scale = np.abs(xs.astype(np.float64)).max(axis=1, keepdims=True) / 127
    rounded = np.rint(xs / scale) * scale
    got = ragged_product(jnp.asarray(xs), packed, jnp.asarray(group_sizes, jnp.int32))
    want = _ragged_reference(rounded, quants, group_sizes)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    unrounded = _ragged_reference(xs, quants, group_sizes)
    assert np.abs(unrounded - want).max() > 1e-3 * np.abs(want).max()  # the rounding shows


def test_bfloat16_compute_dtype_runs_both_paths():
    quants = _experts("int8-per-channel")
    packed = with_compute_dtype(jax.tree.map(jnp.asarray, pack_experts(quants)), jnp.bfloat16)
    for sizes in [FEW, MANY]:
        xs = np.random.default_rng(2).standard_normal((sum(sizes), IN)).astype(np.float32)
        got = ragged_product(jnp.asarray(xs), packed, jnp.asarray(sizes, jnp.int32))
        assert got.dtype == jnp.float32
        want = _ragged_reference(xs, quants, sizes)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("kind", [INT8, FP8])
def test_online_experts_are_per_channel_quantized(kind):
    w = np.random.default_rng(3).standard_normal((E, IN, OUT)).astype(np.float32)
    packed = quantize_experts(w, kind)
    assert packed.kind == kind and packed.group_size == IN and packed.offsets is None
    expected = np.stack([quantize_per_channel(w[e].T, kind).dequantize(np.float32).T
                         for e in range(E)])
    np.testing.assert_array_equal(np.asarray(dequantize_experts(packed, jnp.float32)), expected)
    np.testing.assert_allclose(expected, w, rtol=0.07, atol=0.07 * np.abs(w).max())


# ------------------------------------------------------------------ through the engine

def _engine(model_dir: Path, quantization=None, mesh=None):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    model = load(model_dir, Precision.uniform(jnp.float32), quantization=quantization)
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return model, build_engine(model, ecfg, mesh=mesh, keep_host_params=True)


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 128, size=n).tolist() for n in PROMPT_LENGTHS]


def _moe_layer(params):
    return next(layer.mlp for layer in params.layers if hasattr(layer.mlp, "router"))


def _assert_quantized_experts(params, kind, bits_per_value, of_float32):
    """Every expert stack quantized, its values `bits_per_value` each, and with its scales
    (and offsets) at most `of_float32` of the float32 experts' bytes."""
    moe = _moe_layer(params)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        assert isinstance(w, PackedExperts) and w.kind == kind
        weights = int(np.prod(w.shape))
        assert w.values.nbytes * 8 == weights * bits_per_value
        assert w.nbytes <= of_float32 * weights * 4


FAMILIES = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe-quantized")
    return {family: save_tiny_family(base / family, family) for family in FAMILIES}


@pytest.mark.parametrize("method", sorted(ONLINE_METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_online_quantized_experts_match_transformers(tiny_moe, tmp_path, family, method):
    ref = save_dequantized(tiny_moe[family], tmp_path / "ref", ONLINE_METHODS[method])
    prompts = _prompts()
    expected = [hf_logits(ref, p) for p in prompts]
    model, engine = _engine(tiny_moe[family], method)
    # per channel: one float32 scale per 64 or 48 weights
    _assert_quantized_experts(model.params, ONLINE_METHODS[method], 8, 0.275)
    assert isinstance(model.params.layers[0].attn.wq, PackedWeight)
    assert_ragged_logits(engine, prompts, expected, PLAN, TOL)


def _moe_bytes(params) -> int:
    moe = _moe_layer(params)
    return sum(w.nbytes for w in (moe.w_gate, moe.w_up, moe.w_down))


def test_online_int8_experts_take_about_a_quarter_of_float32(tiny_moe):
    from xla_inference.runner.build import Precision, load

    dense = load(tiny_moe["qwen3_moe"], Precision.uniform(jnp.float32))
    int8 = load(tiny_moe["qwen3_moe"], Precision.uniform(jnp.float32), quantization="int8")
    assert _moe_bytes(int8.params) < 0.3 * _moe_bytes(dense.params)
    assert int8.weight_bytes < 0.4 * dense.weight_bytes


def save_dequantized_fused_experts(src: Path, dst: Path, kind: str) -> Path:
    """save_dequantized, and Llama 4's fused experts ([E, in, out] tensors
    `experts.gate_up_proj`, `experts.down_proj`) each expert's output columns quantized
    per channel; the gate and up halves of gate_up_proj are separate channels anyway."""
    from safetensors.numpy import save_file

    save_dequantized(src, dst, kind)
    tensors = read_tensors(dst)
    for name, t in tensors.items():
        if t.ndim == 3 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            deq = [quantize_per_channel(e.T, kind).dequantize(np.float32).T for e in t]
            # C order: safetensors.numpy writes a transposed array's bytes as if it were
            tensors[name] = np.ascontiguousarray(np.stack(deq))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_llama4_fused_experts_quantized_online(tmp_path):
    """Llama 4's experts come fused and already [in, out] (loaded by slicing): int8 all
    the same, with its shared expert a quantized projection."""
    src = save_tiny_family(tmp_path / "m", "llama4")
    ref = save_dequantized_fused_experts(src, tmp_path / "ref", INT8)
    prompts = _prompts()
    expected = [hf_logits(ref, p, attn_implementation="eager") for p in prompts]
    model, engine = _engine(src, "int8")
    _assert_quantized_experts(model.params, INT8, 8, 0.275)
    assert isinstance(_moe_layer(model.params).shared_expert.w_up, PackedWeight)
    assert_ragged_logits(engine, prompts, expected, PLAN, TOL)


# ------------------------------------------------------------------ a GPTQ MoE checkpoint

GPTQ_GROUP = 16  # divides every input size of the tiny Qwen3-MoE (48 for the experts' down)


def save_gptq_moe(src: Path, dst: Path) -> tuple[Path, Path]:
    """(the GPTQ 4-bit symmetric checkpoint of `src` with every decoder linear, experts
    included, packed as AutoGPTQ does; the float checkpoint holding the dequantized
    integers). The router and the LM head stay float, as in released GPTQ MoE models."""
    from safetensors.numpy import save_file

    quant, ref = dst / "gptq", dst / "ref"
    tensors = read_tensors(src)
    packed, dequantized = {}, dict(tensors)
    for name, w in tensors.items():
        if w.ndim != 2 or not name.endswith("proj.weight") or not name.startswith("model.layers"):
            packed[name] = w
            continue
        prefix = name[:-len("weight")]
        q, z, s = _sym_quantize(w, GPTQ_GROUP, 4)
        dequantized[name] = _dequantize(q, z, s, GPTQ_GROUP).astype(np.float32)
        packed[prefix + "qweight"] = gptq_pack_rows(q.T, 4)
        packed[prefix + "qzeros"] = gptq_pack_columns((z - 1).T, 4)
        packed[prefix + "scales"] = np.ascontiguousarray(s.T.astype(np.float16))
        packed[prefix + "g_idx"] = (np.arange(w.shape[1]) // GPTQ_GROUP).astype(np.int32)
    for path, content in ((quant, packed), (ref, dequantized)):
        path.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                (path / f.name).write_bytes(f.read_bytes())
        save_file(content, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": GPTQ_GROUP, "desc_act": False,
        "sym": True, "lm_head": False, "checkpoint_format": "gptq"}
    (quant / "config.json").write_text(json.dumps(config))
    return quant, ref


def test_gptq_moe_checkpoint_keeps_experts_4bit(tiny_moe, tmp_path):
    quant, ref = save_gptq_moe(tiny_moe["qwen3_moe"], tmp_path)
    prompts = _prompts()
    expected = [hf_logits(ref, p) for p in prompts]
    model, engine = _engine(quant)
    # groups of 16: a float32 scale and offset per 16 half-byte weights
    _assert_quantized_experts(model.params, INT4, 4, 0.25)
    assert _moe_layer(model.params).w_down.group_size == GPTQ_GROUP
    assert_ragged_logits(engine, prompts, expected, PLAN, TOL)


# ------------------------------------------------------------------ expert parallel

@pytest.fixture(scope="module")
def gptq_moe(tiny_moe, tmp_path_factory):
    return save_gptq_moe(tiny_moe["qwen3_moe"], tmp_path_factory.mktemp("gptq-moe"))[0]


# 8 experts over 4 devices: 2 each. Over 3 they do not split: each expert's output rows
# (the MLP width, 48 = 3 tiles of 16) are split instead.
@pytest.mark.parametrize("method,tp", [("int8", 4), ("fp8", 4), ("gptq", 4), ("int8", 3)])
def test_expert_parallel_equals_one_device(tiny_moe, gptq_moe, method, tp):
    from xla_inference.parallel.sharding import build_mesh

    assert len(jax.devices()) >= tp
    model_dir, online = (gptq_moe, None) if method == "gptq" else (tiny_moe["qwen3_moe"], method)
    prompts = _prompts()
    results = []
    for mesh in (None, build_mesh(tp)):
        _, engine = _engine(model_dir, online, mesh)
        reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
        results.append(run_chunks(engine, reqs, PLAN))
    single, sharded = results
    # The kernel rounds each row to 15-bit integers: an input one float32 step apart (sums
    # in another order over the devices) may round one step the other way (1 / 16383), and
    # a flip early on carries through the layers: 2.1e-4 seen at 3 devices on an AVX-512
    # machine. A wrong split moves logits by whole units.
    for key, row in single.items():
        np.testing.assert_allclose(sharded[key], row, rtol=1e-4, atol=5e-4)
    moe = _moe_layer(engine.params)
    split_axis = 0 if tp == 4 else 1  # experts, or row tiles (w_gate's out: the MLP width)
    for arr in (moe.w_gate.values, moe.w_gate.scales):
        assert arr.sharding.spec[split_axis] == "model", arr.sharding.spec
        assert {s.data.shape[split_axis] for s in arr.addressable_shards} == {
            arr.shape[split_axis] // tp}


# ------------------------------------------------------------------ through vllm.LLM

@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_quantized_moe_greedily_as_transformers(tiny_moe, tmp_path):
    """vllm.LLM on xla-inference (float32): --quantization int8 on Qwen3-MoE and its GPTQ
    4-bit checkpoint give transformers' greedy tokens on the dequantized weights."""
    from tests.e2e.test_llm_quantized import NUM_NEW, _ours
    from tests.e2e.test_llm_quantized import _prompts as greedy_prompts
    from tests.helpers import hf_greedy_ids

    src = tiny_moe["qwen3_moe"]
    expected = hf_greedy_ids(save_dequantized(src, tmp_path / "ref", INT8), greedy_prompts(),
                             NUM_NEW)
    assert _ours(src, quantization="int8", dtype="float32") == expected
    quant, ref = save_gptq_moe(src, tmp_path / "gptq")
    assert _ours(quant, dtype="float32") == hf_greedy_ids(ref, greedy_prompts(), NUM_NEW)
