"""Collective matmuls (parallel/collective_matmul.py) on the 8 virtual CPU devices: each
equals the float64 numpy product, and its compiled program moves data by collective
permutes (the ring) where GSPMD's plain product has an all-reduce. The layers' row-parallel
projections (attention output, MLP down) take the ring only when the step is traced over a
tensor-parallel mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xla_inference.layers.linear import project, row_parallel_project
from xla_inference.layers.mlp import GatedMlp, gated_mlp
from xla_inference.parallel import collective_matmul as cm
from xla_inference.parallel.sharding import build_mesh, traced_over

_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                         r"(?:-start)?\(")


def collectives(compiled_text: str) -> dict[str, int]:
    """How many of each collective op the compiled HLO runs."""
    counts = {}
    for name in _COLLECTIVE.findall(compiled_text):
        counts[name] = counts.get(name, 0) + 1
    return counts


def _put(mesh, array, *spec):
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec(*spec)))


def _random(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _f64_product(x, w):
    return np.einsum("...i,oi->...o", x.astype(np.float64), w.astype(np.float64))


@pytest.mark.parametrize("tp,lead", [(2, (1,)), (4, (5,)), (8, (16,)), (4, (2, 3))])
def test_row_parallel_matmul_equals_the_product(tp, lead):
    """x [..., F] split on F, w [D, F] split on F -> whole x @ w.T on every device; decode
    (one token) and prefill shapes, and a batch axis in front."""
    mesh = build_mesh(tp)
    x, w = _random(tp, (*lead, 8 * tp), (48, 8 * tp))
    split_x = (None,) * len(lead) + ("model",)
    run = jax.jit(lambda x, w: cm.row_parallel_matmul(x, w, mesh))
    y = run(_put(mesh, x, *split_x), _put(mesh, w, None, "model"))
    np.testing.assert_allclose(np.asarray(y), _f64_product(x, w), rtol=1e-5, atol=1e-5)
    assert y.sharding.is_fully_replicated
    hlo = run.lower(_put(mesh, x, *split_x), _put(mesh, w, None, "model")).compile().as_text()
    found = collectives(hlo)
    assert "all-reduce" not in found, found
    assert found.get("collective-permute", 0) == tp - 1, found  # one hop per ring step


def test_gspmd_plain_product_all_reduces():
    """The baseline the ring replaces: the same shardings, left to GSPMD, all-reduce."""
    mesh = build_mesh(4)
    x, w = _random(0, (5, 32), (48, 32))
    run = jax.jit(lambda x, w: jnp.einsum("ti,oi->to", x, w),
                  out_shardings=NamedSharding(mesh, PartitionSpec()))
    found = collectives(run.lower(_put(mesh, x, None, "model"),
                                  _put(mesh, w, None, "model")).compile().as_text())
    assert found.get("all-reduce", 0) >= 1 and "collective-permute" not in found, found


@pytest.mark.parametrize("tp", [2, 8])
def test_matmul_reduce_scatter_leaves_each_device_its_chunk(tp):
    mesh = build_mesh(tp)
    x, w = _random(1, (6, 4 * tp), (8 * tp, 4 * tp))
    y = jax.jit(lambda x, w: cm.matmul_reduce_scatter(x, w, mesh))(
        _put(mesh, x, None, "model"), _put(mesh, w, None, "model"))
    want = _f64_product(x, w)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    for shard in y.addressable_shards:  # device i: output features chunk i only
        assert shard.data.shape == (6, 8)
        np.testing.assert_allclose(np.asarray(shard.data), want[shard.index], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_all_gather_matmul_equals_the_product(tp):
    """x [T, D] split over tokens, w [F, D] column-parallel -> x @ w.T split on F; the
    tokens travel the ring (collective permutes, no all-gather)."""
    mesh = build_mesh(tp)
    x, w = _random(2, (3 * tp, 24), (4 * tp, 24))
    run = jax.jit(lambda x, w: cm.all_gather_matmul(x, w, mesh))
    args = (_put(mesh, x, "model", None), _put(mesh, w, "model", None))
    y = run(*args)
    np.testing.assert_allclose(np.asarray(y), _f64_product(x, w), rtol=1e-5, atol=1e-5)
    assert y.sharding.spec == PartitionSpec(None, "model")
    found = collectives(run.lower(*args).compile().as_text())
    assert found == {"collective-permute": tp - 1}, found


def test_narrow_weights_take_the_layers_product():
    """bfloat16 weights against float32 activations (the CPU precision policy): the ring
    runs layers/linear.project on each chunk, so the result is the bf16-rounded product."""
    mesh = build_mesh(4)
    x, w = _random(3, (7, 64), (32, 64))
    w16 = jnp.asarray(w, jnp.bfloat16)
    y = jax.jit(lambda x, w: cm.row_parallel_matmul(x, w, mesh, product=project))(
        _put(mesh, x, None, "model"), _put(mesh, w16, None, "model"))
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    want = _f64_product(x16, np.asarray(w16.astype(jnp.float32)))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def _mlp(seed, D, F, mesh):
    wg, wu, wd, x = _random(seed, (F, D), (F, D), (D, F), (9, D))
    wg, wu, wd = wg / np.sqrt(D), wu / np.sqrt(D), wd / np.sqrt(F)  # outputs of order one
    params = GatedMlp(_put(mesh, wg, "model", None), _put(mesh, wu, "model", None),
                      _put(mesh, wd, None, "model"))
    return params, _put(mesh, x), (wg, wu, wd, x)


def _mlp_reference(wg, wu, wd, x):
    x, wg, wu, wd = (a.astype(np.float64) for a in (x, wg, wu, wd))
    gate = x @ wg.T
    return (gate / (1 + np.exp(-gate)) * (x @ wu.T)) @ wd.T


@pytest.fixture
def ring_always(monkeypatch):
    """The ring for every step size on every platform (by default the CPU keeps GSPMD's
    all-reduce: collective_matmul.ring_pays)."""
    monkeypatch.setattr(cm, "RING_POLICY", "always")
    yield
    jax.clear_caches()  # the policy is no part of JAX's trace cache key


@pytest.mark.parametrize("tp", [2, 4])
def test_gated_mlp_down_projection_is_a_ring_under_tensor_parallel(tp, ring_always):
    """Traced over the mesh (as the engine traces its step), the MLP's down projection is
    the ring: no all-reduce left; traced without it, GSPMD's all-reduce; both equal numpy."""
    mesh = build_mesh(tp)
    params, x, host = _mlp(tp, 32, 16 * tp, mesh)
    ring = jax.jit(traced_over(mesh, gated_mlp))
    plain = jax.jit(gated_mlp)
    want = _mlp_reference(*host)
    for run, has_ring in ((ring, True), (plain, False)):
        np.testing.assert_allclose(np.asarray(run(params, x)), want, rtol=1e-5, atol=1e-5)
        found = collectives(run.lower(params, x).compile().as_text())
        assert ("all-reduce" not in found) == has_ring, found
        assert (found.get("collective-permute", 0) == tp - 1) == has_ring, found


def test_by_default_the_cpu_keeps_the_all_reduce():
    """ring_pays' default: on the CPU (where the ring measured slower) and for decode-sized
    steps anywhere, the plain product and GSPMD's all-reduce, even traced over the mesh."""
    assert cm.RING_POLICY == "auto" and jax.default_backend() == "cpu"
    assert not cm.ring_pays(4096)
    mesh = build_mesh(2)
    params, x, host = _mlp(0, 32, 32, mesh)
    run = jax.jit(traced_over(mesh, gated_mlp))
    np.testing.assert_allclose(np.asarray(run(params, x)), _mlp_reference(*host), rtol=1e-5,
                               atol=1e-5)
    found = collectives(run.lower(params, x).compile().as_text())
    assert found.get("all-reduce", 0) >= 1 and "collective-permute" not in found, found


def test_ring_policy_on_accelerators(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not cm.ring_pays(cm.RING_MIN_TOKENS - 1) and cm.ring_pays(cm.RING_MIN_TOKENS)
    monkeypatch.setattr(cm, "RING_POLICY", "never")
    assert not cm.ring_pays(1 << 20)


def test_row_parallel_project_keeps_the_plain_product_where_nothing_is_split(ring_always):
    """No mesh, one device on the model axis, or heads that do not divide (SmolLM2's 9
    heads under TP 2: wo replicated): the plain product, no collective at all."""
    x, w, b = _random(4, (3, 72), (40, 72), (40,))
    want = _f64_product(x, w) + b
    for mesh, units in ((None, 9), (build_mesh(1), 9), (build_mesh(2), 9)):
        fn = lambda x, w, b: row_parallel_project(x, w, b, logical_axis="heads", units=units)  # noqa: E731
        run = jax.jit(fn if mesh is None else traced_over(mesh, fn))
        np.testing.assert_allclose(np.asarray(run(x, w, b)), want, rtol=1e-5, atol=1e-5)
        assert collectives(run.lower(x, w, b).compile().as_text()) == {}
