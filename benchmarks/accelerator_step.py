"""Accelerator check: the attention kernel on the device, then the core engine's step at
Llama-3.1-8B shapes with random weights. Run through benchmarks/gpu_check.sh (which also
runs the kernel test matrix); alone:

    PYTHONPATH=. python benchmarks/accelerator_step.py [--smoke] [--json out.json]

Needs only numpy, jax (with the device's plugin: jax[cuda12] on an NVIDIA GPU, jax[tpu] on
a TPU) and ml_dtypes (a dependency of jax): no vLLM, no network, no checkpoint.

1. Kernel check: the device's Pallas attention kernel (gpu: kernels/pallas_gpu_attention,
   tpu: kernels/pallas_tpu_attention; on a CPU the GPU kernel in interpret mode) on a
   mixed step at Llama-3.1-8B attention shapes (32 query heads, 8 kv heads, head dim 128,
   bf16; decodes at 1k-4k context, a chunked prefill, a prefix hit) against the plain-jnp
   kernel in float32 on the same device; then the kernel alone over 8 layers' caches
   (decode batch 1 at 4k, batch 64 at 1k, a 2k prefill), as KV bytes read per second and
   against the jnp kernel in the same run.
2. Core step: the engine (runner/build.py, runner/engine.py: the step vLLM's worker runs,
   whichever attention backend kernels/backend.py picks) at Llama-3.1-8B shapes in bf16,
   random weights (vLLM's dummy-weight range), decode at batch 1/16/64/256 with 1k and 4k
   contexts, and a 2048-token prefill. Decode: achieved HBM bandwidth = (weights read +
   each sequence's K/V) / step time, as a fraction of the device's peak; prefill: MFU =
   (projection + causal attention FLOPs) / step time / the device's bf16 dense peak. Peaks
   come from the device kind (H100/H200/A100/L4, TPU v4/v5e/v5p/v6e tables); on an
   unknown device they are measured (a large reduction, a large matmul) and marked so.
   Cases whose KV cache does not fit the device's memory are listed as skipped.
3. Quantized MoE experts: one grouped product (Qwen3-30B-A3B's gate projection shapes: 128
   experts, 2048 -> 768; int8 per channel and 4-bit in groups of 128) through the Pallas
   grouped matmul over the experts as the loader stores them (quantization/experts.
   stored_for_step: its K-major layout, made at load), against the same product with the
   tiles converted inside the step (what the step did before) and against XLA's
   dequantize-then-ragged_dot, timed in the same run; expert bytes read per second as a
   fraction of peak HBM bandwidth.
4. Sharded MoE (only where JAX sees more than one device): a bf16 MoE block (Qwen3-30B-A3B's
   expert shapes, 128 experts, 2048 -> 768, 8 per token) through layers/moe.moe_mlp with the
   experts split over a mesh of the devices (expert parallel: the Pallas GMM on each
   device's experts in a shard_map, one all-reduce), against the block on one device: the
   same output (2% of its scale), no all-gather in the compiled program, and both timed.

--smoke: tiny shapes (2 layers, hidden 256), short contexts; for CI on a CPU (interpret
mode; the MoE part: the GPU kernel in interpret mode, 8 small experts). --kernels jnp
(or pallas-gpu, ...): the engine's attention backend, to compare the Pallas kernel's step
with the jnp kernel's in another run; --skip-moe leaves part 3 out. Exit status: 0 when every part
ran and the kernel check passed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPUs: allocate as needed
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

REQUIRED = ("numpy", "jax", "ml_dtypes")


def check_dependencies() -> list[str]:
    """The modules the core engine imports that are missing (vLLM, torch, safetensors and
    gguf are not needed for random weights)."""
    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


# (substring of jax's device_kind, HBM bytes/s, bf16 dense FLOP/s), first match wins:
# vendor datasheet figures.
PEAKS = (
    ("H200 NVL", 4.8e12, 835e12), ("GH200", 4.0e12, 989e12), ("H200", 4.8e12, 989e12),
    ("H100 NVL", 3.9e12, 835e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12),
    ("H800", 3.35e12, 989e12), ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12), ("A100", 1.555e12, 312e12),
    ("L40S", 0.864e12, 362e12), ("L4", 0.3e12, 121e12),
    ("TPU v6", 1.64e12, 918e12), ("TPU v5 lite", 0.819e12, 197e12),
    ("TPU v5e", 0.819e12, 197e12), ("TPU v5", 2.765e12, 459e12), ("TPU v4", 1.2e12, 275e12),
)

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "torch_dtype": "bfloat16",
}
SMOKE_MODEL = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)

FULL = dict(model=LLAMA_31_8B, batches=(1, 16, 64, 256), contexts=(1024, 4096), prefill=2048,
            repeats=5, kernel=dict(decode=((1, 4096), (64, 1024)), prefill=2048, layers=8,
                                   heads=(32, 8, 128)),
            moe=dict(experts=128, inp=2048, out=768, rows=(512, 4096),
                     kinds=(("int8", None), ("int4", 128)), sharded_tokens=512))
SMOKE = dict(model=SMOKE_MODEL, batches=(1, 4), contexts=(64, 160), prefill=64, repeats=1,
             kernel=dict(decode=((1, 160),), prefill=32, layers=2, heads=(4, 2, 64)),
             moe=dict(experts=8, inp=64, out=64, rows=(32,), kinds=(("int8", None),),
                      sharded_tokens=16))
BLOCK = 16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, CI)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds; core-step cases that would start later are skipped "
                             "(and listed)")
    parser.add_argument("--kernels", default=None,
                        help="the engine's attention backend (XLA_INFERENCE_KERNELS: jnp, "
                             "pallas-gpu, pallas-tpu, native; default: chosen by platform)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="also trace five decode steps at batch 1 (JAX's profiler) and "
                             "write the Perfetto trace (.json.gz) here")
    parser.add_argument("--check-deps", action="store_true",
                        help="only check the Python dependencies and the device")
    args = parser.parse_args(argv)
    missing = check_dependencies()
    if missing:
        print(f"FAIL: missing Python modules: {', '.join(missing)} (pip install "
              f"{' '.join(missing)}; on an NVIDIA GPU: pip install 'jax[cuda12]')")
        return 2
    device = describe_device(measure=not args.check_deps, small=args.smoke)
    peaks = ("not measured" if device["bandwidth"] is None else
             f"HBM {device['bandwidth'] / 1e9:.0f} GB/s, bf16 {device['flops'] / 1e12:.1f} "
             f"TFLOP/s")
    print(f"device: {device['kind']} ({device['platform']}) x{device['count']}, memory "
          f"{_gib(device['memory'])}, peaks: {peaks} ({device['peak_source']})")
    if args.check_deps:
        return 0
    if device["platform"] == "cpu" and not args.smoke:
        print("FAIL: no accelerator (JAX's default backend is cpu); for a CPU run use "
              "--smoke. On an NVIDIA GPU check that jax's CUDA plugin is installed "
              "(python -c 'import jax; print(jax.devices())').")
        return 2
    if args.kernels:
        os.environ["XLA_INFERENCE_KERNELS"] = args.kernels
    shapes = SMOKE if args.smoke else FULL
    deadline = time.perf_counter() + args.budget
    report = dict(device=device, smoke=args.smoke)
    status = 0
    if not args.skip_kernel:
        report["kernel"] = _guarded("kernel check", kernel_check, device, shapes)
        status |= 0 if report["kernel"].get("passed") else 1
    if not args.skip_engine:
        report["engine"] = _guarded("core step", engine_benchmark, device, shapes, deadline,
                                    args.profile)
        if ("error" in report["engine"] and not args.smoke
                and os.environ.get("XLA_INFERENCE_KERNELS") != "jnp"):
            # The numbers still matter on a rare accelerator run: once more on the jnp kernel.
            os.environ["XLA_INFERENCE_KERNELS"] = "jnp"
            print("core step: once more with XLA_INFERENCE_KERNELS=jnp")
            report["engine_jnp"] = _guarded("core step (jnp attention)", engine_benchmark,
                                            device, shapes, deadline)
        status |= 1 if "error" in report["engine"] or report["engine"].get("skipped_for_time") \
            else 0
    if not args.skip_moe:
        report["moe"] = _guarded("quantized MoE", moe_benchmark, device, shapes, deadline)
        status |= 1 if "error" in report["moe"] else 0
        if device["count"] > 1:
            report["moe_sharded"] = _guarded("sharded MoE", moe_sharded_check, device, shapes)
            status |= 1 if "error" in report["moe_sharded"] else 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print("accelerator_step:", "OK" if status == 0 else "FAILED")
    return status


def _guarded(what, fn, *args) -> dict:
    """fn(*args), or {"error": ...} with the traceback printed: one part failing (a kernel
    that does not compile on this device) leaves the others to run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says FAILED
        traceback.print_exc()
        print(f"{what}: FAILED: {type(e).__name__}: {str(e)[:500]}")
        return dict(error=f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------
# Device


def describe_device(measure: bool = True, small: bool = False) -> dict:
    import jax

    dev = jax.devices()[0]
    platform = jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    stats = (dev.memory_stats() or {}) if hasattr(dev, "memory_stats") else {}
    info = dict(kind=dev.device_kind, platform=platform, count=len(jax.devices()),
                memory=stats.get("bytes_limit"))
    for needle, bandwidth, flops in PEAKS:
        if needle.lower() in dev.device_kind.lower():
            return dict(info, bandwidth=bandwidth, flops=flops, peak_source="datasheet")
    if not measure:
        return dict(info, bandwidth=None, flops=None, peak_source="unknown device kind")
    return dict(info, bandwidth=measure_bandwidth(1 << (24 if small else 28)),
                flops=measure_matmul_peak(512 if small else 2048),
                peak_source="measured: unknown device kind")


def median_seconds(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile / warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(nbytes: int = 1 << 28) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    return nbytes / median_seconds(lambda: f(x), 3)


def measure_matmul_peak(n: int = 2048) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_seconds(lambda: f(a, a), 3)


def _gib(nbytes) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------
# 1. Kernel check and kernel-alone timing


def device_kernel(platform: str):
    """(paged_attention of the device's Pallas kernel, interpret?)"""
    if platform == "tpu":
        from xla_inference.kernels import pallas_tpu_attention as module
    else:
        from xla_inference.kernels import pallas_gpu_attention as module
    return module.paged_attention, platform not in ("gpu", "tpu")


def _mixed_step(rng, specs, num_heads, num_kv_heads, head_dim, dtype, num_tokens):
    """A random step over a cache that holds each sequence's K/V: (q, k_cache, v_cache,
    seq_ids, positions, block_tables), the padding tokens at position 0 of row 0."""
    import jax.numpy as jnp
    import numpy as np

    max_blocks = max(-(-(c + n) // BLOCK) for c, n in specs)
    num_pages = 1 + sum(-(-(c + n) // BLOCK) for c, n in specs)
    tables = np.zeros((len(specs), max_blocks), np.int32)
    pages = rng.permutation(np.arange(1, num_pages))
    seq_ids, positions, used = [], [], 0
    for row, (cached, new) in enumerate(specs):
        n_pages = -(-(cached + new) // BLOCK)
        tables[row, :n_pages] = pages[used:used + n_pages]
        used += n_pages
        seq_ids += [row] * new
        positions += list(range(cached, cached + new))
    pad = num_tokens - len(seq_ids)
    seq_ids, positions = seq_ids + [0] * pad, positions + [0] * pad
    cache_shape = (num_pages * BLOCK, num_kv_heads, head_dim)
    q = rng.standard_normal((num_tokens, num_heads, head_dim))
    k, v = rng.standard_normal(cache_shape), rng.standard_normal(cache_shape)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(seq_ids, jnp.int32), jnp.asarray(positions, jnp.int32),
            jnp.asarray(tables))


def kernel_check(device: dict, shapes: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention

    kernel, interpret = device_kernel(device["platform"])
    num_heads, num_kv_heads, head_dim = shapes["kernel"]["heads"]
    rng = np.random.default_rng(0)
    smoke = device["platform"] == "cpu"
    specs = ([(100, 1), (0, 20), (40, 9), (33, 1)] if smoke else
             [(4000, 1), (1023, 1), (0, 300), (700, 128), (2048, 64), (1, 1)])
    num_tokens = 64 if smoke else 512
    args = _mixed_step(rng, specs, num_heads, num_kv_heads, head_dim, jnp.bfloat16, num_tokens)
    kw = dict(block_size=BLOCK, scale=head_dim ** -0.5)
    got = jax.jit(lambda *a: kernel(*a, interpret=interpret, **kw))(*args)
    f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
    want = jax.jit(lambda *a: ragged_paged_attention(*a, native=False, **kw))(*f32)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    passed = bool(np.isfinite(err) and err < 2e-2)
    print(f"kernel check ({kernel.__module__.split('.')[-1]}, {'interpret' if interpret else 'native'}"
          f"): mixed step, {len(specs)} sequences, {num_tokens} tokens, bf16: max |error| vs "
          f"the jnp kernel in f32 = {err:.2e} -> {'PASS' if passed else 'FAIL'}")
    timings = kernel_timings(kernel, interpret, device, shapes)
    return dict(max_abs_error=err, passed=passed, timings=timings)


def kernel_timings(kernel, interpret, device, shapes) -> list[dict]:
    """The kernel alone over `layers` separate caches (so L2 does not hold them), per step,
    against the jnp kernel; decode as KV bytes read per second."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention

    ks = shapes["kernel"]
    num_heads, num_kv_heads, head_dim = ks["heads"]
    layers = ks["layers"]
    rows = []
    cases = [(f"decode b{b} ctx{c}", [(c, 1)] * b) for b, c in ks["decode"]]
    cases.append((f"prefill {ks['prefill']}", [(0, ks["prefill"])]))
    rng = np.random.default_rng(1)
    for name, specs in cases:
        num_tokens = sum(n for _, n in specs)
        q, k, v, seq_ids, positions, tables = _mixed_step(
            rng, specs, num_heads, num_kv_heads, head_dim, jnp.bfloat16, num_tokens)
        k_layers = jnp.stack([k] * layers)  # distinct buffers per layer
        v_layers = jnp.stack([v] * layers)
        kw = dict(block_size=BLOCK, scale=head_dim ** -0.5)

        def run(attend):
            # The caches and step arrays are arguments (closed over, they were compiled in as
            # 2 GB of constants), and the layers unrolled, so that only kernels are timed:
            # in a rolled scan, each trip of XLA:GPU's while loop can cost a device-to-host
            # read of its predicate. (The H200's rolled run read 44 us a batch-1 decode
            # layer at 4k context; the engine's profiled step, 5 us a layer at 1k.)
            def layers_in_turn(q0, k_all, v_all, ids, pos, bt):
                def body(carry, kv):
                    out = attend(carry, kv[0], kv[1], ids, pos, bt, **kw)
                    return out.astype(carry.dtype), None
                return jax.lax.scan(body, q0, (k_all, v_all), unroll=True)[0]
            fn = jax.jit(layers_in_turn)
            return lambda: fn(q, k_layers, v_layers, seq_ids, positions, tables)

        pallas = run(lambda *a, **k2: kernel(*a, interpret=interpret, **k2))
        plain = run(lambda *a, **k2: ragged_paged_attention(*a, native=False, **k2))
        t_kernel = median_seconds(pallas, shapes["repeats"]) / layers
        t_jnp = median_seconds(plain, shapes["repeats"]) / layers
        kv_bytes = sum(c + n for c, n in specs) * 2 * num_kv_heads * head_dim * 2
        row = dict(case=name, kernel_s=t_kernel, jnp_s=t_jnp,
                   kv_bandwidth_fraction=kv_bytes / t_kernel / device["bandwidth"])
        rows.append(row)
        print(f"  kernel alone, {name:18s}: {t_kernel * 1e6:9.1f} us/layer (jnp kernel "
              f"{t_jnp * 1e6:9.1f} us, {t_jnp / t_kernel:5.2f}x), KV read at "
              f"{row['kv_bandwidth_fraction']:.0%} of peak HBM bandwidth")
    return rows


# ---------------------------------------------------------------------------------------
# 2. Core step at Llama-3.1-8B shapes


class _TiledRandom:
    """Random weights fast: a block of uniform [-1e-3, 1e-3] values (vLLM's dummy-weight
    range) in the target dtype, repeated over each tensor's shape (drawing 8 billion values
    one by one takes minutes; the step's speed does not depend on the values)."""

    def __init__(self, dtype, seed: int = 0, period: int = 1_000_003):
        import numpy as np

        self._block = np.random.default_rng(seed).uniform(-1e-3, 1e-3, period).astype(dtype)

    def shaped(self, shape):
        import numpy as np

        return np.resize(self._block, shape)


def build_model(hf_config: dict, layers: int):
    import jax.numpy as jnp

    from xla_inference.loading import params as loading_params
    from xla_inference.models.registry import model_family
    from xla_inference.runner.build import LoadedModel, Precision

    hf_config = dict(hf_config, num_hidden_layers=layers)
    precision = Precision.uniform(jnp.bfloat16)

    class TiledRandomTensors(loading_params.RandomTensors):
        def __init__(self):
            super().__init__(0)
            self._tiled = _TiledRandom(precision.activations)

        def shaped(self, shape):
            return self._tiled.shaped(shape)

    family = model_family(hf_config)
    cfg = family.config_from_hf(hf_config)
    params = family.load_params(TiledRandomTensors(), cfg, precision.activations)
    params = loading_params.pack_quantized(params, precision.weights, precision.activations)
    return LoadedModel(family, cfg, params, precision)


def _layer_bytes(hf) -> tuple[int, int, int]:
    """(bytes of one layer's weights, of the embedding table, of the rest: embedding,
    untied lm_head, final norm) in bf16."""
    D, F, V = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    H, N, K = hf["head_dim"], hf["num_attention_heads"], hf["num_key_value_heads"]
    layer = 2 * (D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D)
    return layer, 2 * V * D, 2 * (2 * V * D + D)


def _matmul_flops_per_token(hf) -> int:
    D, F, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    H, N, K = hf["head_dim"], hf["num_attention_heads"], hf["num_key_value_heads"]
    return 2 * L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)


def _decode_requests(batch, context, first_page, vocab, rng):
    from xla_inference.runner.requests import RequestState

    pages_each = -(-(context + 1) // BLOCK)
    reqs = []
    for i in range(batch):
        pages = list(range(first_page + i * pages_each, first_page + (i + 1) * pages_each))
        tokens = rng.integers(0, vocab, size=context + 1).tolist()
        reqs.append((RequestState(f"d{i}", tokens, context, [pages],
                                  num_computed_tokens=context), 1))
    return reqs


def engine_benchmark(device: dict, shapes: dict, deadline: float = float("inf"),
                     profile: str | None = None) -> dict:
    import jax
    import numpy as np

    from xla_inference.runner.build import build_engine
    from xla_inference.runner.engine import EngineConfig

    hf = shapes["model"]
    layer_bytes, embed_bytes, rest_bytes = _layer_bytes(hf)
    kv_token = 2 * hf["num_key_value_heads"] * hf["head_dim"] * 2  # K and V, bf16, per layer
    layers = hf["num_hidden_layers"]
    memory = device["memory"]
    headroom = 6 * 2**30
    if memory is not None:
        # A device too small for the whole model (a 16 GiB TPU v5e) runs fewer layers: the
        # per-step fractions stay meaningful; the line below says so.
        fit = int((0.6 * memory - rest_bytes - headroom) // layer_bytes)
        layers = max(1, min(layers, fit))
    weights = layers * layer_bytes + rest_bytes
    kv_budget = (None if memory is None else
                 memory * 0.92 - weights - headroom)
    n_prefill = shapes["prefill"]
    cases = [(b, c) for c in shapes["contexts"] for b in shapes["batches"]]
    tokens_needed = {case: case[0] * (-(-(case[1] + 1) // BLOCK)) * BLOCK for case in cases}
    per_token = kv_token * layers
    fits = [case for case in cases
            if kv_budget is None or tokens_needed[case] * per_token <= kv_budget]
    skipped = [case for case in cases if case not in fits]
    num_blocks = 2 + max([tokens_needed[c] // BLOCK for c in fits]
                         + [-(-shapes["prefill"] // BLOCK)])
    print(f"core step: Llama-3.1-8B shapes{' (smoke: tiny)' if shapes is SMOKE else ''}, "
          f"{layers} of {hf['num_hidden_layers']} layers, bf16, random weights "
          f"{weights / 2**30:.2f} GiB, KV cache {num_blocks * BLOCK * per_token / 2**30:.2f} GiB"
          f", attention backend: {_attention_backend_name()}")
    t0 = time.perf_counter()
    model = build_model(hf, layers)
    ecfg = EngineConfig(num_blocks=num_blocks, block_size=BLOCK,
                        max_num_tokens=max(shapes["prefill"], max(shapes["batches"])),
                        max_num_seqs=max(shapes["batches"]),
                        max_model_len=max(shapes["contexts"]) + BLOCK * 2)
    engine = build_engine(model, ecfg)
    jax.block_until_ready(engine.params)
    print(f"  weights drawn and placed in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    if profile:
        _profile_decode(engine, _decode_requests(1, shapes["contexts"][0], 1,
                                                 hf["vocab_size"], rng), profile)
    weights_read = weights - embed_bytes  # the embedding table: only the batch's rows
    rows, late = [], []
    # Batch 1 and the prefill first: the figures the goals are about.
    order = ([("decode", case) for case in fits if case[0] == 1] + [("prefill", None)]
             + [("decode", case) for case in fits if case[0] != 1])
    for kind, case in order:
        name = f"decode b{case[0]} ctx{case[1]}" if kind == "decode" else f"prefill {n_prefill}"
        if time.perf_counter() > deadline:
            late.append(name)
            continue
        if kind == "decode":
            batch, context = case
            reqs = _decode_requests(batch, context, 1, hf["vocab_size"], rng)
            t = median_seconds(lambda: engine.forward(reqs).logits, shapes["repeats"])
            nbytes = weights_read + batch * (context + 1) * per_token
            row = dict(case=name, seconds=t, tokens_per_s=batch / t,
                       hbm_fraction=nbytes / t / device["bandwidth"])
            print(f"  {name:22s} {t * 1e3:9.2f} ms  {batch / t:9.0f} tok/s  HBM "
                  f"{nbytes / t / 1e9:7.0f} GB/s = {row['hbm_fraction']:.0%} of peak")
        else:
            row = _prefill_row(engine, hf, layers, n_prefill, rng, shapes["repeats"], device)
        rows.append(row)
    for batch, context in skipped:
        print(f"  decode b{batch} ctx{context}: skipped, its KV cache "
              f"({tokens_needed[(batch, context)] * per_token / 2**30:.0f} GiB) does not fit "
              "the device")
    for name in late:
        print(f"  {name}: skipped, past the time budget (--budget)")
    return dict(layers=layers, weights_bytes=weights, rows=rows,
                skipped=[f"decode b{b} ctx{c}" for b, c in skipped], skipped_for_time=late)


def _profile_decode(engine, reqs, out: str, steps: int = 5) -> None:
    """Where a batch-1 decode step's time goes: the host's share (until forward returns,
    the device still working under JAX's asynchronous dispatch) against the whole step, then
    `steps` steps under JAX's profiler, its Perfetto trace copied to `out` (one file, so
    that it can be read where the profiler's own folder tree cannot travel)."""
    import glob
    import shutil
    import tempfile

    import jax

    jax.block_until_ready(engine.forward(reqs).logits)  # compile / warm
    host, whole = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        result = engine.forward(reqs).logits
        host.append(time.perf_counter() - t0)
        jax.block_until_ready(result)
        whole.append(time.perf_counter() - t0)
    print(f"  profile: decode b1, forward returns after {statistics.median(host) * 1e3:.2f} ms"
          f", result ready after {statistics.median(whole) * 1e3:.2f} ms (medians of 10)")
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(engine.forward(reqs).logits)
        traces = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        if traces:
            shutil.copy(traces[0], out)
        print(f"  profile: {steps} steps traced -> {out if traces else 'no Perfetto trace'}")


def _prefill_row(engine, hf, layers, n, rng, repeats, device) -> dict:
    """One n-token prompt from position 0: MFU over its projection and causal attention
    FLOPs (the lm_head runs on one row per request: left out)."""
    from xla_inference.runner.requests import RequestState

    prefill = [(RequestState("p", rng.integers(0, hf["vocab_size"], size=n).tolist(), n,
                             [list(range(1, 1 + -(-n // BLOCK)))], 0), n)]
    t = median_seconds(lambda: engine.forward(prefill).logits, repeats)
    attention_flops = 4 * layers * hf["num_attention_heads"] * hf["head_dim"] * n * (n + 1) // 2
    flops = n * _matmul_flops_per_token(dict(hf, num_hidden_layers=layers)) + attention_flops
    row = dict(case=f"prefill {n}", seconds=t, tokens_per_s=n / t,
               mfu=flops / t / device["flops"])
    print(f"  {row['case']:22s} {t * 1e3:9.2f} ms  {n / t:9.0f} tok/s  "
          f"{flops / t / 1e12:7.1f} TFLOP/s = MFU {row['mfu']:.0%}")
    return row


def _attention_backend_name() -> str:
    try:
        from xla_inference.kernels import backend
    except ImportError:
        return "jnp (no kernels/backend.py in this tree)"
    chosen = backend.attention_backend()
    return chosen.name + (" (interpret)" if chosen.interpret else "")


# ---------------------------------------------------------------------------------------
# 3. Quantized MoE experts: the stored layout against converting in the step


def _random_tiles(rng, num_experts, inp, out, kind, group):
    """PackedExperts of random bytes in the native tiles (OUT_IN; any bytes are valid
    values) with float16 scales; 4 bits with offsets, as GPTQ's."""
    import numpy as np

    from xla_inference.quantization.experts import PackedExperts
    from xla_inference.quantization.packed import kernel_group_size

    group = kernel_group_size(group or inp, inp, kind)  # per channel: groups of 128, as pack
    chunks = inp // (4 if kind == "int4" else 2)
    dtype = np.uint8 if kind == "int4" else np.int8
    values = rng.integers(-128 if kind == "int8" else 0, 128 if kind == "int8" else 256,
                          (num_experts, out // 16, chunks, 32)).astype(dtype)
    groups = (num_experts, out // 16, inp // group, 16)
    scales = rng.uniform(1e-3, 2e-3, groups).astype(np.float16)
    offsets = rng.uniform(-0.01, 0.01, groups).astype(np.float16) if kind == "int4" else None
    return PackedExperts(values, scales, offsets, kind, group, inp, out,
                         compute_dtype="bfloat16")


def _converted_in_step(w):
    """w's tiles converted to the kernel's layout inside the traced step (the old way)."""
    import dataclasses
    import functools

    import jax

    from xla_inference.kernels import pallas_quantized_matmul as qmm
    from xla_inference.quantization.packed import K_MAJOR

    layout = functools.partial(qmm.accelerator_layout, bits=w.bits, in_features=w.in_features,
                               out_features=w.out_features)
    if w.offsets is None:
        (values, scales), offsets = jax.vmap(lambda v, s: layout(v, s, None)[:2])(
            w.values, w.scales), None
    else:
        values, scales, offsets = jax.vmap(layout)(w.values, w.scales, w.offsets)
    return dataclasses.replace(w, values=values, scales=scales, offsets=offsets,
                               layout=K_MAJOR)


def _check_moe_outputs(stored, in_step, xla, case: str) -> None:
    """The stored layout's product must equal the in-step conversion's (the same kernel on
    the same values) and XLA's (bf16 weights: 2% of the output's scale)."""
    import numpy as np

    stored, in_step, xla = (np.asarray(a, np.float32) for a in (stored, in_step, xla))
    scale = float(np.abs(xla).max()) or 1.0
    if not np.array_equal(stored, in_step) or np.abs(stored - xla).max() > 2e-2 * scale:
        raise AssertionError(f"quantized MoE {case}: the stored layout's product differs (max "
                             f"|stored - converted in step| {np.abs(stored - in_step).max():.3g}"
                             f", |stored - XLA| {np.abs(stored - xla).max():.3g}, scale "
                             f"{scale:.3g})")


def moe_benchmark(device: dict, shapes: dict, deadline: float = float("inf")) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xla_inference.kernels import cpu_quantized, pallas_gmm
    from xla_inference.quantization import experts

    ms = shapes["moe"]
    saved = {name: os.environ.get(name) for name in (pallas_gmm.GMM_BACKEND_VARIABLE,
                                                     "XLA_INFERENCE_CPU_QUANTIZED")}
    if device["platform"] == "cpu":  # smoke: the GPU kernel in interpret mode, not the
        os.environ[pallas_gmm.GMM_BACKEND_VARIABLE] = "gpu"  # CPU's native kernel
        os.environ["XLA_INFERENCE_CPU_QUANTIZED"] = "0"
        cpu_quantized.available.cache_clear()
    forced = saved[pallas_gmm.GMM_BACKEND_VARIABLE]
    try:
        route = pallas_gmm.gmm_route()
        if route is None:
            raise RuntimeError("no Pallas grouped matmul route on this device "
                               f"({pallas_gmm.GMM_BACKEND_VARIABLE}={forced!r})")
        print(f"quantized MoE: {ms['experts']} experts [{ms['inp']} -> {ms['out']}], bf16 "
              f"activations, Pallas {route.backend} GMM{' (interpret)' if route.interpret else ''}")
        rng = np.random.default_rng(0)
        rows = []
        for kind, group in ms["kinds"]:
            tiles = _random_tiles(rng, ms["experts"], ms["inp"], ms["out"], kind, group)
            stored = experts.stored_for_step(tiles)
            if stored.layout != "k-major":
                print(f"  {kind}: the kernel does not take these shapes: skipped")
                continue
            stored_dev, tiles_dev = (jax.tree.map(jnp.asarray, w) for w in (stored, tiles))
            expert_bytes = stored.nbytes
            product = jax.jit(experts.ragged_product)
            in_step = jax.jit(lambda x, w, g: experts.ragged_product(x, _converted_in_step(w), g))
            xla = jax.jit(lambda x, w, g: jax.lax.ragged_dot(
                x, experts.dequantize_experts(w, x.dtype), g,
                preferred_element_type=jnp.float32).astype(x.dtype))
            for n in ms["rows"]:
                if time.perf_counter() > deadline:
                    print(f"  {kind} {n} rows: skipped, past the time budget (--budget)")
                    continue
                x = jnp.asarray(rng.standard_normal((n, ms["inp"])), jnp.bfloat16)
                sizes = jnp.asarray(np.bincount(rng.integers(0, ms["experts"], n),
                                                minlength=ms["experts"]), jnp.int32)
                _check_moe_outputs(product(x, stored_dev, sizes), in_step(x, tiles_dev, sizes),
                                   xla(x, tiles_dev, sizes), f"{kind} {n} rows")
                t = {name: median_seconds(lambda f=f, w=w: f(x, w, sizes), shapes["repeats"])
                     for name, f, w in (("stored", product, stored_dev),
                                        ("in_step", in_step, tiles_dev),
                                        ("xla", xla, tiles_dev))}
                row = dict(case=f"{kind} {n} rows", stored_s=t["stored"],
                           converted_in_step_s=t["in_step"], xla_dequantize_s=t["xla"],
                           hbm_fraction=expert_bytes / t["stored"] / device["bandwidth"])
                rows.append(row)
                print(f"  {row['case']:16s} stored layout {t['stored'] * 1e3:8.3f} ms, converted "
                      f"in the step {t['in_step'] * 1e3:8.3f} ms ({t['in_step'] / t['stored']:.2f}x"
                      f"), XLA dequantize + ragged_dot {t['xla'] * 1e3:8.3f} ms "
                      f"({t['xla'] / t['stored']:.2f}x); experts read at "
                      f"{row['hbm_fraction']:.0%} of peak HBM bandwidth")
        return dict(rows=rows, backend=route.backend, interpret=route.interpret)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        cpu_quantized.available.cache_clear()


def _moe_block(rng, num_experts, inp, out):
    """A bf16 MoE block of random experts (router scaled so the routing is decisive)."""
    import jax.numpy as jnp

    from xla_inference.layers.moe import MoeMlp

    normal = lambda *shape: jnp.asarray(  # noqa: E731
        rng.standard_normal(shape) / shape[1] ** 0.5, jnp.bfloat16)
    return MoeMlp(router=normal(inp, num_experts) * 4, w_gate=normal(num_experts, inp, out),
                  w_up=normal(num_experts, inp, out), w_down=normal(num_experts, out, inp))


def moe_sharded_check(device: dict, shapes: dict) -> dict:
    """Part 4 (module docstring): the experts split over the largest power-of-two count of
    devices that divides them, through the device's Pallas GMM (interpret mode on a CPU)."""
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np

    from xla_inference.kernels import pallas_gmm
    from xla_inference.layers.moe import MoeConfig, moe_mlp
    from xla_inference.parallel.sharding import (build_mesh, param_shardings, place_params,
                                                 traced_over)

    ms = shapes["moe"]
    saved = os.environ.get(pallas_gmm.GMM_BACKEND_VARIABLE)
    if device["platform"] == "cpu":  # smoke: the GPU kernel in interpret mode
        os.environ[pallas_gmm.GMM_BACKEND_VARIABLE] = "gpu"
    try:
        route = pallas_gmm.gmm_route()
        if route is None:
            raise RuntimeError("no Pallas grouped matmul route on this device")
        tp = 1
        while tp * 2 <= device["count"] and ms["experts"] % (tp * 2) == 0:
            tp *= 2
        cfg = MoeConfig(num_experts=ms["experts"], num_experts_per_tok=min(8, ms["experts"]),
                        intermediate_size=ms["out"], norm_topk_prob=True)
        rng = np.random.default_rng(0)
        block = _moe_block(rng, ms["experts"], ms["inp"], ms["out"])
        x = jnp.asarray(rng.standard_normal((ms["sharded_tokens"], ms["inp"])), jnp.bfloat16)
        one = jax.jit(lambda p, x: moe_mlp(p, x, cfg))
        mesh = build_mesh(tp)
        placed = place_params(block, param_shardings(
            block, types.SimpleNamespace(moe=cfg, intermediate_size=ms["out"]), mesh))
        sharded = jax.jit(traced_over(mesh, lambda p, x: moe_mlp(p, x, cfg))).lower(
            placed, x).compile()
        gathers = sharded.as_text().count(" all-gather(")
        want, got = (np.asarray(a, np.float32) for a in (one(block, x), sharded(placed, x)))
        scale = float(np.abs(want).max()) or 1.0
        if gathers or np.abs(got - want).max() > 2e-2 * scale:
            raise AssertionError(f"sharded MoE over {tp} devices: {gathers} all-gathers, max "
                                 f"|sharded - one device| {np.abs(got - want).max():.3g} "
                                 f"(scale {scale:.3g})")
        t_one = median_seconds(lambda: one(block, x), shapes["repeats"])
        t_sharded = median_seconds(lambda: sharded(placed, x), shapes["repeats"])
        print(f"sharded MoE: {ms['experts']} bf16 experts [{ms['inp']} -> {ms['out']}], "
              f"{ms['sharded_tokens']} tokens, k = {cfg.num_experts_per_tok}: experts split over "
              f"{tp} devices {t_sharded * 1e3:.3f} ms, one device {t_one * 1e3:.3f} ms "
              f"({t_one / t_sharded:.2f}x); no all-gather, outputs agree")
        return dict(devices=tp, sharded_s=t_sharded, one_device_s=t_one,
                    backend=route.backend, interpret=route.interpret)
    finally:
        if saved is None:
            os.environ.pop(pallas_gmm.GMM_BACKEND_VARIABLE, None)
        else:
            os.environ[pallas_gmm.GMM_BACKEND_VARIABLE] = saved


if __name__ == "__main__":
    sys.exit(main())
