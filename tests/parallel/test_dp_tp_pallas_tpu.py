"""The Pallas TPU attention kernel under data parallel x tensor parallel (DP 2 x TP 2 on the
8 virtual CPU devices): the replicas' shard_map (manual over the data axis, as
runner/engine._forward_replicas) with attention's own shard_map over the KV heads nested
inside it (layers/attention._split_by_kv_heads).

Found: the TPU interpret mode brackets every kernel with an ordered io_callback, and JAX
threads the ordered effect's token through each enclosing shard_map; XLA's Shardy export
aborts the process on a token in a *nested* manual computation (a CHECK in
HloSharding::ValidateTuple). The GSPMD partitioner lowers the same program, and the
compiled Mosaic kernel carries no token at all. So:
- the abort itself, reproduced without any of our code in a child process (it fails
  here the day JAX fixes it, and the refusal below can go);
- under Shardy the nested interpret kernel is refused with a clear error, not an abort;
- under GSPMD the interpret kernel at DP 2 x TP 2 gives the jnp kernel's outputs on one
  device and writes the same cache;
- exported for TPU (the real Mosaic path, no interpret), the same DP x TP program holds
  the kernel's tpu_custom_calls inside the nested manual computations and no token."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from xla_inference.kernels import backend as kernel_backend
from xla_inference.kernels.metadata import AttentionMetadata, LayerCache
from xla_inference.layers.attention import paged_attention
from xla_inference.parallel.sharding import build_mesh, traced_over

BLOCK, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 4, 2, 32
RUNS = [(20, 1), (0, 9), (7, 3)]  # (cached, new) per sequence: a decode, a prefill, a chunk
NUM_TOKENS, NUM_PAGES, MAX_BLOCKS = 16, 8, 2
REAL_TOKENS = sum(new for _, new in RUNS)  # the rest is padding (its rows are don't-care)
DP, TP = 2, 2


def _step(seed):
    """One replica's step on shuffled pages, padding written into the null page 0."""
    rng = np.random.default_rng(seed)
    pages = rng.permutation(np.arange(1, NUM_PAGES))
    tables = np.zeros((len(RUNS) + 1, MAX_BLOCKS), np.int32)
    seq_ids = np.full(NUM_TOKENS, len(RUNS), np.int32)
    positions, slots = np.zeros(NUM_TOKENS, np.int32), np.zeros(NUM_TOKENS, np.int32)
    start, used = 0, 0
    for row, (cached, new) in enumerate(RUNS):
        n = -(-(cached + new) // BLOCK)
        tables[row, :n] = pages[used:used + n]
        used += n
        pos = np.arange(cached, cached + new)
        seq_ids[start:start + new], positions[start:start + new] = row, pos
        slots[start:start + new] = tables[row, pos // BLOCK] * BLOCK + pos % BLOCK
        start += new
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(NUM_TOKENS, NUM_HEADS, HEAD_DIM)
    k, v = normal(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM), normal(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM)
    caches = tuple(normal(NUM_PAGES * BLOCK, NUM_KV_HEADS, HEAD_DIM) for _ in "kv")
    md = AttentionMetadata(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(slots[None]),
                           jnp.asarray(tables[None]), block_size=BLOCK)
    return (q, k, v, *caches, md)


def _attend(q, k, v, k_cache, v_cache, md):
    kv, out = paged_attention(q, k, v, LayerCache((k_cache, v_cache), np.int32(0)), md,
                              scale=HEAD_DIM ** -0.5)
    return (*kv.arrays, out)


def _replicas(mesh):
    """Each data-axis slice attends with its own replica's step, as the engine's DP step."""
    def replica(*stacked):
        outs = _attend(*jax.tree.map(lambda a: a[0], stacked))
        return tuple(o[None] for o in outs)

    data = PartitionSpec("data")
    return traced_over(mesh, lambda *args: jax.shard_map(
        replica, mesh=mesh, in_specs=(data,) * 6, out_specs=(data,) * 3,
        axis_names={"data"}, check_vma=False)(*args))


def _stacked_steps():
    steps = [_step(seed) for seed in range(DP)]
    return steps, jax.tree.map(lambda *a: jnp.stack(a), *steps)


@pytest.fixture
def tpu_kernel(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_KERNELS", kernel_backend.PALLAS_TPU)
    monkeypatch.setenv("XLA_INFERENCE_PALLAS_INTERPRET", "1")
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture
def gspmd_partitioner():
    before = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    jax.clear_caches()
    yield
    jax.config.update("jax_use_shardy_partitioner", before)
    jax.clear_caches()


_NESTED_ORDERED_CALLBACK = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import io_callback
    from jax.sharding import Mesh, PartitionSpec as P
    jax.config.update("jax_use_shardy_partitioner", sys.argv[1] == "shardy")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    def inner(x):
        return io_callback(lambda a: a, jax.ShapeDtypeStruct(x.shape, x.dtype), x,
                           ordered=True) * 2
    def outer(x):
        return jax.shard_map(inner, mesh=jax.sharding.get_abstract_mesh(),
                             in_specs=P("model"), out_specs=P("model"),
                             axis_names={"model"}, check_vma=False)(x)
    f = jax.shard_map(outer, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                      axis_names={"data"}, check_vma=False)
    print(np.asarray(jax.jit(f)(jnp.arange(8.0))).tolist())
""")


@pytest.mark.parametrize("partitioner", ["shardy", "gspmd"])
def test_an_ordered_callback_in_nested_shard_maps_aborts_only_under_shardy(partitioner):
    run = subprocess.run([sys.executable, "-c", _NESTED_ORDERED_CALLBACK, partitioner],
                         capture_output=True, text=True, timeout=120)
    if partitioner == "shardy":
        assert run.returncode < 0, run.stdout  # killed by SIGABRT
        assert "Check failed" in run.stderr and "ValidateTuple" in run.stderr, run.stderr[-2000:]
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split("\n")[-2] == str([2.0 * i for i in range(8)])


def test_nested_interpret_kernel_is_refused_under_shardy(tpu_kernel):
    assert jax.config.jax_use_shardy_partitioner
    mesh = build_mesh(TP, data_parallel_size=DP)
    with pytest.raises(RuntimeError, match="JAX_USE_SHARDY_PARTITIONER=false"):
        jax.jit(_replicas(mesh)).lower(*_stacked_steps()[1])


@pytest.mark.slow  # 15-30 s: the interpret mode compiles slowly
def test_dp2_tp2_interpret_kernel_equals_the_jnp_kernel(tpu_kernel, gspmd_partitioner,
                                                        monkeypatch):
    steps, stacked = _stacked_steps()
    k_caches, v_caches, out = jax.jit(_replicas(build_mesh(TP, data_parallel_size=DP)))(*stacked)
    monkeypatch.setenv("XLA_INFERENCE_KERNELS", kernel_backend.JNP)
    jax.clear_caches()
    reference = jax.jit(_attend)
    for replica, step in enumerate(steps):
        want_k, want_v, want = reference(*step)
        np.testing.assert_allclose(np.asarray(out[replica, :REAL_TOKENS]),
                                   np.asarray(want[:REAL_TOKENS]), rtol=1e-5, atol=1e-5)
        # The null page (0) takes the padding's writes in whichever order: not compared.
        for got, expected in ((k_caches, want_k), (v_caches, want_v)):
            assert np.array_equal(np.asarray(got[replica, BLOCK:]), np.asarray(expected[BLOCK:]))


def test_the_compiled_tpu_path_nests_without_a_token(monkeypatch):
    """Exported for TPU (Mosaic, no interpret mode): the kernel's custom calls sit in the
    model-axis manual computation inside the data-axis one, and no token is threaded."""
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1))
    monkeypatch.setenv("XLA_INFERENCE_KERNELS", kernel_backend.PALLAS_TPU)
    monkeypatch.delenv("XLA_INFERENCE_PALLAS_INTERPRET", raising=False)
    monkeypatch.setattr(kernel_backend, "_platform", lambda: "tpu")
    jax.clear_caches()
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _stacked_steps()[1])
    mesh = build_mesh(TP, data_parallel_size=DP)
    module = jax.export.export(jax.jit(_replicas(mesh)), platforms=["tpu"])(*shapes).mlir_module()
    jax.clear_caches()
    assert module.count("tpu_custom_call") == 2  # the decode and tile schedules
    assert "stablehlo.token" not in module
    manual = [line.strip() for line in module.splitlines() if "manual_axes" in line]
    assert len(manual) == 2, manual
    data_level = module.index('manual_axes={"data"}')
    model_level = module.index('manual_axes={"model"}')
    assert data_level < model_level < module.index("tpu_custom_call")
