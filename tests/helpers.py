"""Shared test utilities: tiny random HF checkpoints and a reference step driver."""

import contextlib
import functools
import json
from pathlib import Path

import numpy as np


def save_tiny_llama(path: Path, *, tie: bool = False, rope_scaling: dict | None = None,
                    num_kv_heads: int = 2, seed: int = 0, sharded: bool = False,
                    num_layers: int = 2, max_positions: int = 512) -> Path:
    """A random LlamaForCausalLM (2 layers unless `num_layers`) saved as a HF checkpoint
    (float32)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=10000.0, rope_scaling=rope_scaling, bos_token_id=1, eos_token_id=2,
    )
    return save_tiny_model(path, config, seed=seed, sharded=sharded)


def save_tiny_gemma3(path: Path, *, final_soft_cap: float | None = 1.5, tie: bool = True,
                     seed: int = 0) -> Path:
    """A 3-layer random Gemma3ForCausalLM (sliding, global, sliding; window 8), float32.

    head_dim is 32 because vLLM's CPU path needs at least that; the attention scalar, the
    rope bases and the global layers' rope scaling all differ from each other and from
    their defaults, so that a mix-up shows.
    """
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        max_position_embeddings=512, rms_norm_eps=1e-6, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}},
        final_logit_softcapping=final_soft_cap, initializer_range=0.1, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return save_tiny_model(path, config, seed=seed)


def save_tiny_model(path: Path, config, *, seed: int = 0, sharded: bool = False) -> Path:
    """A random model of any transformers `config` saved as a HF checkpoint (float32), with
    the word tokenizer for its vocabulary."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so bugs show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    save_word_tokenizer(path, config.vocab_size)
    return path


def save_tiny_family(path: Path, family: str, *, seed: int = 0, **overrides) -> Path:
    """A 2-layer random model of `family` ("qwen2", "qwen3", "mistral", "qwen3_moe",
    "mixtral"), float32, head_dim 32 (vLLM's CPU path needs at least that); `overrides`
    change its transformers config.

    Qwen3's head_dim is set apart from hidden_size // num_heads; Mistral's window (8) is
    shorter than the test sequences, so that it matters. The MoE families route each token
    to 2 of 8 experts (Qwen3-MoE: layer 0 dense, experts of another width than its MLP),
    with router weights large enough (initializer_range 0.1) that the routing is decisive.
    "llama4" has 4 layers (see its entry), 1 of 4 experts plus the shared expert.
    """
    import transformers

    common = dict(vocab_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    own = {"qwen2": (transformers.Qwen2Config, dict(hidden_size=128)),
           "qwen3": (transformers.Qwen3Config, dict(hidden_size=64, head_dim=32)),
           "mistral": (transformers.MistralConfig,
                       dict(hidden_size=64, head_dim=32, sliding_window=8)),
           "qwen3_moe": (transformers.Qwen3MoeConfig,
                         dict(hidden_size=64, head_dim=32, moe_intermediate_size=48, num_experts=8,
                              num_experts_per_tok=2, mlp_only_layers=[0], initializer_range=0.1)),
           "mixtral": (transformers.MixtralConfig,
                       dict(hidden_size=64, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                            initializer_range=0.1)),
           # 4 layers: rope, rope+MoE, rope, NoPE+MoE; chunks of 8; temperature tuning that
           # already matters at position 3 (floor_scale 4).
           "llama4": (transformers.Llama4TextConfig,
                      dict(hidden_size=64, head_dim=32, num_hidden_layers=4, intermediate_size=48,
                           intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
                           interleave_moe_layer_step=2, attention_chunk_size=8, use_qk_norm=True,
                           floor_scale=4, attn_scale=0.5, initializer_range=0.1))}
    config_cls, defaults = own[family]
    # Through the constructor, so that derived fields (Qwen2's layer_types) follow overrides.
    config = config_cls(**{**common, **defaults, **overrides})
    return save_tiny_model(path, config, seed=seed)


def hf_model(model_dir: Path, **overrides):
    """transformers' float32 model for a checkpoint, loaded once per session for each
    (directory, overrides): tests score many prompts against the same reference.
    `overrides` go to from_pretrained (config attributes, attn_implementation)."""
    return _hf_model(str(model_dir), tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=4)
def _hf_model(model_dir: str, overrides: tuple):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, **dict(overrides)).eval()


def hf_logits(model_dir: Path, token_ids: list[int], **overrides) -> np.ndarray:
    """Logits [len, V] of transformers' own implementation, float32 (hf_model)."""
    import torch

    model = hf_model(model_dir, **overrides)
    with torch.no_grad():
        out = model(torch.tensor([token_ids]))
    return out.logits[0].numpy()


@contextlib.contextmanager
def bf16_linear_inputs():
    """transformers as dtype=bfloat16 runs on the host CPU: every nn.Linear rounds its
    input to bfloat16 and multiplies in float32 (on a float32 model of a checkpoint from
    `save_bf16_rounded`, whose weights already hold bfloat16 values)."""
    import torch

    plain = torch.nn.Linear.forward

    def rounded(self, x):
        return plain(self, x.to(torch.bfloat16).to(x.dtype))

    torch.nn.Linear.forward = rounded
    try:
        yield
    finally:
        torch.nn.Linear.forward = plain


@contextlib.contextmanager
def bf16_keys_and_values():
    """transformers' Llama attention (eager or SDPA) reading its keys (after RoPE) and values
    rounded to bfloat16, as a bfloat16 KV cache stores them (dtype=bfloat16 on the host CPU
    with the native attention kernel, runner/build.py cpu_kv_cache_dtype)."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    def rounding(attend):
        def rounded(module, query, key, value, *args, **kwargs):
            return attend(module, query, key.to(torch.bfloat16).to(key.dtype),
                          value.to(torch.bfloat16).to(value.dtype), *args, **kwargs)
        return rounded

    eager = modeling_llama.eager_attention_forward
    modeling_llama.eager_attention_forward = rounding(eager)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = rounding(ALL_ATTENTION_FUNCTIONS["sdpa"])
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward = eager
        del ALL_ATTENTION_FUNCTIONS["sdpa"]  # the local override; the global one is back


def rewrite_checkpoint(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint `src` at `dst`, one safetensors file, the LM head untied (its
    own copy of the embedding), each tensor replaced by change(name, tensor) (a torch
    tensor; return it unchanged to keep it, None to drop it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    for index in dst.glob("*.index.json"):
        index.unlink()
    config = read_json(dst / "config.json")
    if config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        config["tie_word_embeddings"] = False
        (dst / "config.json").write_text(json.dumps(config))
    tensors = {name: change(name, t) for name, t in tensors.items()}
    tensors = {name: t for name, t in tensors.items() if t is not None}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def save_bf16_rounded(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` whose weight matrices (2-D, all but the embedding) hold
    their values rounded to bfloat16, still float32, with an untied LM head: with
    `bf16_linear_inputs`, the reference for dtype=bfloat16 on the host CPU (bfloat16
    projections, float32 elsewhere: loading/params.py's narrow_projections)."""
    import torch

    def rounded(name, t):
        if t.ndim >= 2 and name != "model.embed_tokens.weight":
            return t.to(torch.bfloat16).to(torch.float32)
        return t

    return rewrite_checkpoint(src, dst, rounded)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_word_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer "t0 t1 ..." whose ids are the vocabulary of a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                   eos_token="t2")
    fast.save_pretrained(path)


_ON_ONE_CPU = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jax, jax.numpy as jnp, numpy as np
from xla_inference.kernels import cpu_dense
assert cpu_dense.%s()
a = np.load(sys.argv[1])
y = cpu_dense.%s(a["x"], jnp.asarray(a["w"]).view(jnp.bfloat16))
np.save(sys.argv[2], np.asarray(y))
"""


def dense_kernel_on_one_cpu(kernel: str, available: str, x, w, tmp_path: Path) -> np.ndarray:
    """cpu_dense.<kernel>(x, w) (w bfloat16) in a subprocess pinned to one CPU before JAX
    starts (so its pool has no helper threads), after asserting cpu_dense.<available>():
    the kernels' outputs must not depend on how the work was shared out."""
    import os
    import subprocess
    import sys

    np.savez(tmp_path / "in.npz", x=x, w=np.asarray(w).view(np.uint16))
    subprocess.run([sys.executable, "-c", _ON_ONE_CPU % (available, kernel), tmp_path / "in.npz",
                    tmp_path / "out.npy"], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    return np.load(tmp_path / "out.npy")


@contextlib.contextmanager
def spare_core_off(library):
    """A kernel library with its spare core (kernels/cpu/spare_core.h) off, as
    XLA_INFERENCE_SPARE_CORE=0 makes it: every call on the calling thread or the pool."""
    library.XlaInferenceUseSpareCore(0)
    try:
        yield
    finally:
        library.XlaInferenceUseSpareCore(1)


def spare_core_testing_build(source: Path, targets: dict[str, str], flags=()):
    """`source`'s build (with extra compile `flags`) whose spare core's helper runs at normal
    priority (the default build's runs at SCHED_IDLE, which a busy test machine may never
    give a CPU; this one takes items within a few calls) and can be made to pause in each
    item (its library's XlaInferenceSpareCoreTestDelay); returns the library, `targets`
    registered."""
    import ctypes

    from xla_inference.kernels import native

    library = native.load_targets(source, targets, (*native.DEFAULT_FLAGS, *flags,
                                                    "-DXLA_INFERENCE_SPARE_CORE_TESTING=1"))
    library.XlaInferenceSpareCoreTestDelay.argtypes = [ctypes.c_int64]
    return library


def call_until_spare_core_counts(library, which: int, calls, expected, seconds: float = 30.0):
    """Runs calls() (a list of outputs) until `library`'s spare core counts one more item of
    kind `which` (0: finished by the helper, 1: taken back from it), asserting each call's
    outputs equal to `expected`; returns how many calls that took."""
    import time

    from xla_inference.kernels import native

    before = native.spare_core_items(library)[which]
    deadline = time.monotonic() + seconds
    count = 0
    while native.spare_core_items(library)[which] == before:
        assert time.monotonic() < deadline, "the spare core's helper took no item"
        for got, want in zip(calls(), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)
        count += 1
    return count


def pallas_interpret(backend: str) -> bool:
    """Pallas interpret mode unless this process runs on the kernel's own device ("tpu" or
    "gpu"): benchmarks/gpu_check.sh runs the same tests natively on a GPU or TPU."""
    import jax

    return jax.default_backend() != backend


def hf_greedy_ids(model_dir: Path, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """transformers' greedy continuation (float32) of each prompt. EOS neither stops it nor
    is suppressed, as with vLLM's ignore_eos (generate's min_new_tokens would ban EOS)."""
    from tests.sampling_reference import hf_processed_greedy
    from xla_inference.sampling.host import SamplingOptions

    return [hf_processed_greedy(model_dir, ids, num_new, SamplingOptions()) for ids in prompts]


def hf_image_greedy(model_class: str, type_ids: str, model_dir: Path, text: str, images: list,
                    num_new: int) -> list[int]:
    """transformers' greedy continuation (float32) of an image prompt by the model class
    `model_class`: the whole sequence run again for each token (the model recomputes its
    image masks or positions each time), the processor's `type_ids` (token type ids, 0 for a
    text token) grown with it; EOS neither stopping nor banned (vLLM's ignore_eos)."""
    import torch
    import transformers

    inputs = transformers.AutoProcessor.from_pretrained(model_dir)(
        text=[text], images=images or None, return_tensors="pt")
    model = getattr(transformers, model_class).from_pretrained(model_dir).eval()
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    new = []
    with torch.no_grad():
        for _ in range(num_new):
            token = int(model(input_ids=ids, **inputs).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if type_ids in inputs:
                inputs[type_ids] = torch.cat(
                    [inputs[type_ids], torch.zeros((1, 1), dtype=torch.long)], dim=1)
    return new


# A ModelEngine driven directly (no vLLM): pages of ENGINE_BLOCK tokens, up to 32 tokens a request.
ENGINE_BLOCK = 4


def tiny_engine(model_dir: Path, max_num_tokens: int = 64, mesh=None, narrow_dtype=None,
                kv_dtype=None):
    """A float32 ModelEngine built as the worker builds one (runner/build.py), on one
    device or over `mesh`; projections in narrow_dtype and the KV cache in kv_dtype if given
    (dtype=bfloat16 on the host CPU: both bfloat16)."""
    import jax.numpy as jnp

    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    f32 = jnp.dtype(jnp.float32)
    model = load(model_dir, Precision(jnp.dtype(narrow_dtype or f32), f32,
                                      jnp.dtype(kv_dtype or f32)))
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=max_num_tokens,
                        max_num_seqs=8, max_model_len=128)
    return build_engine(model, ecfg, mesh=mesh)


class RecordedProgram:
    """A step program (runner/engine.Programs) that hands each call's arguments to
    note(args) first: tests see which program ran which step."""

    def __init__(self, program, note):
        self.program, self.note, self.takes_argmax = program, note, program.takes_argmax

    def __call__(self, *args):
        self.note(args)
        return self.program(*args)


def engine_request(req_id: str, tokens: list[int], first_block: int):
    """A request owning pages first_block .. first_block + 7 (room for 32 tokens)."""
    from xla_inference.runner.requests import RequestState

    blocks = list(range(first_block, first_block + 32 // ENGINE_BLOCK))
    return RequestState(req_id, list(tokens), len(tokens), [blocks], 0)


def run_chunks(engine, reqs, chunk_plan) -> dict:
    """Run steps; chunk_plan is a list of steps, each {req_index: num_tokens}. Returns
    the logits row of every (request id, last position) computed."""
    rows = {}
    for step in chunk_plan:
        scheduled = [(reqs[i], n) for i, n in step.items()]
        logits = np.asarray(engine.forward(scheduled).logits)
        for row, (req, n) in enumerate(scheduled):
            req.num_computed_tokens += n
            rows[(req.req_id, req.num_computed_tokens - 1)] = logits[row]
    return rows


def assert_config_edit_names_tensor(model_dir: Path, edit: tuple[str, str], tensor: str) -> None:
    """Edit config.json (old -> new text) so a weight no longer fits it: loading must fail
    with a WeightMismatchError naming `tensor`."""
    import re

    import jax.numpy as jnp
    import pytest

    from xla_inference.loading.params import WeightMismatchError
    from xla_inference.models.loader import load_model

    cfg_path = model_dir / "config.json"
    text = cfg_path.read_text()
    assert edit[0] in text
    cfg_path.write_text(text.replace(*edit))
    with pytest.raises(WeightMismatchError, match=re.escape(repr(tensor))):
        load_model(model_dir, jnp.float32)


def assert_ragged_logits(engine, prompts, expected, plan, tol: float) -> None:
    """Run `plan` (steps of {request index: tokens}) on `engine`; every computed position's
    logits must match `expected[request][position]`."""
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    rows = run_chunks(engine, reqs, plan)
    assert len(rows) == sum(len(step) for step in plan)
    for (rid, pos), got in rows.items():
        np.testing.assert_allclose(got, expected[int(rid[1:])][pos], rtol=tol, atol=tol)


def pallas_tpu_gmm_in_interpret_mode(monkeypatch):
    """A fixture body (yield from it): the MoE experts through the Pallas TPU GMM in
    interpret mode, the native CPU expert kernel off (it keeps its own tiles); the choices
    read afresh by each test (the route is read at trace, available() is cached)."""
    import jax

    from xla_inference.kernels import cpu_quantized, pallas_gmm

    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "0")
    monkeypatch.setenv(pallas_gmm.GMM_BACKEND_VARIABLE, "tpu")
    jax.clear_caches()
    cpu_quantized.available.cache_clear()
    yield
    jax.clear_caches()
    cpu_quantized.available.cache_clear()
