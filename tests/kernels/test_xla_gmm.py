"""kernels/xla_gmm.py, the CPU's grouped matmul (ragged_dot's contract as a loop over the
Pallas GMM's work list), against float64 numpy: rows sorted by group, empty groups, rows
outside every group zero; float32 and bfloat16; any tile. Rows outside every group add no
work item (the loop's trip count), and the MoE layer on one device takes this loop, not
ragged_dot (which XLA's CPU runs as every row times every expert); over experts split on a
mesh GSPMD partitions (even without the engine's context mesh) it keeps ragged_dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import pallas_gmm, xla_gmm


def _reference(lhs, rhs, sizes) -> np.ndarray:
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


@pytest.mark.parametrize("dtype,tile", [(jnp.float32, None), (jnp.float32, 1),
                                        (jnp.float32, 16), (jnp.bfloat16, 32)])
def test_equals_float64_reference(dtype, tile):
    rng = np.random.default_rng(0)
    m, e, k, n = 100, 6, 40, 24
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
    step = jax.jit(lambda a, b, s: xla_gmm.gmm(a, b, s, tile=tile))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    # All rows in groups; empty groups (first, middle, last); 37 rows outside every group.
    for sizes in ([20, 0, 33, 1, 30, 16], [0, 40, 0, 0, 23, 0], [0, 0, 0, 0, 0, 0]):
        got = np.asarray(step(lhs, rhs, jnp.asarray(sizes, jnp.int32)), np.float64)
        assert step(lhs, rhs, jnp.asarray(sizes, jnp.int32)).dtype == dtype
        np.testing.assert_allclose(got, _reference(lhs, rhs, sizes), rtol=tol, atol=tol)
        assert not got[sum(sizes):].any()


def test_rows_outside_every_group_add_no_work():
    """The loop's trip count counts the tiles holding group rows only: half the rows
    outside every group halve it; none in groups: no item at all."""
    m, tm = 256, 32
    count = jax.jit(lambda sizes: xla_gmm.work_items(pallas_gmm.group_metadata(
        sizes, m // tm, tm)))
    items = lambda sizes: int(count(jnp.asarray(sizes, jnp.int32)))  # noqa: E731
    assert items([64, 64, 64, 64]) == 8  # groups on tile boundaries: one item a tile
    assert items([32, 32, 32, 32]) == 4
    assert items([30, 34, 20, 44]) == 4 + 2  # two tiles shared by two groups each
    assert items([0, 0, 0, 0]) == 0


def test_moe_layer_on_one_device_takes_the_loop(monkeypatch):
    """layers/moe.py's grouped products on one device run the loop, never ragged_dot
    (traced with ragged_dot refused)."""
    from tests.parallel.test_moe_expert_parallel import CFG, D, T, _dense_block
    from xla_inference.layers.moe import moe_mlp

    def refused(*args, **kwargs):
        raise AssertionError("ragged_dot on one device")

    monkeypatch.setattr(jax.lax, "ragged_dot", refused)
    block = _dense_block()
    x = np.random.default_rng(1).standard_normal((T * 4, D)).astype(np.float32)
    jax.jit(moe_mlp, static_argnums=2)(block, x, CFG).block_until_ready()
    # (its output against the dense reference: tests/models/test_moe.py)


@pytest.mark.parametrize("kind", ["float32", "fp8"])
def test_moe_layer_jitted_over_split_experts_without_the_mesh_keeps_ragged_dot(kind,
                                                                             monkeypatch):
    """A jax.jit over experts placed split on 2 devices, without the engine's context mesh
    (parallel/sharding.traced_over): GSPMD partitions the step all the same, so the grouped
    products keep ragged_dot (the loop would have GSPMD gather every expert whole: it
    reads experts by a dynamic index); float32 experts stay split (no expert gathered).
    Against the float64 reference of tests/parallel/test_moe_lora_split.py (no adapter)."""
    import re
    import types

    from tests.parallel.test_collective_matmul import collectives
    from tests.parallel.test_moe_expert_parallel import CFG, D, E, T, _dense_block
    from tests.parallel.test_moe_lora_split import _adapter_stacks, _reference
    from xla_inference.layers.moe import MoeMlp, moe_mlp
    from xla_inference.parallel.sharding import build_mesh, param_shardings, place_params
    from xla_inference.quantization.experts import quantize_experts, uses_native_kernel

    def refused(*args, **kwargs):
        raise AssertionError("the work-list loop over experts GSPMD partitions")

    monkeypatch.setattr(xla_gmm, "gmm", refused)
    block = _dense_block()
    if kind != "float32":
        block = MoeMlp(block.router, *(quantize_experts(w, kind)
                                       for w in (block.w_gate, block.w_up, block.w_down)))
        assert not uses_native_kernel(block.w_gate)  # dequantized in the step: the loop's
    model_cfg = types.SimpleNamespace(moe=CFG, intermediate_size=48)
    mesh = build_mesh(2)
    placed = place_params(block, param_shardings(block, model_cfg, mesh))
    values = placed.w_gate if kind == "float32" else placed.w_gate.values
    assert values.sharding.spec[0] == "model"
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)  # T*k > E rows
    compiled = jax.jit(lambda p, x: moe_mlp(p, x, CFG)).lower(placed, x).compile()
    want = _reference(block, _adapter_stacks(), np.zeros(T, np.int32), x)
    np.testing.assert_allclose(np.asarray(compiled(placed, x)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    hlo = compiled.as_text()
    gathered = re.findall(rf"\w+\[{E},\d+,\d+\]\S* all-gather\(", hlo)
    assert kind != "float32" or gathered == [], collectives(hlo)
