"""Which attention kernel serves the process (kernels/backend.py) and the dispatch of
ragged_paged_attention through it.

The dispatch checks put a recording stand-in where each kernel is looked up (its module's
paged_attention), trace a call, and check which kernel was called and with which
arguments; the kernels' own
answers are tested in their own files (and, through a whole model step, in
test_accelerator_model_step.py).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import backend, cpu_attention, pallas_tpu_attention
from xla_inference.kernels import ragged_paged_attention as rpa


def ragged_paged_attention(*args, **kwargs):
    """Trace the kernel (no compilation): the backend is chosen, and a kernel called,
    when a step is traced."""
    return jax.eval_shape(functools.partial(rpa.ragged_paged_attention, **kwargs), *args)


@pytest.fixture
def env(monkeypatch):
    """Set XLA_INFERENCE_KERNELS / _PALLAS_INTERPRET (None: unset) for one test."""
    def set_env(kernels=None, interpret=None):
        for name, value in [("XLA_INFERENCE_KERNELS", kernels),
                            ("XLA_INFERENCE_PALLAS_INTERPRET", interpret)]:
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
    set_env()
    return set_env


def test_auto_follows_the_platform(env, monkeypatch):
    assert backend.attention_backend().name == "native"  # this machine: JAX on the CPU
    for platform, name in [("tpu", "pallas-tpu"), ("gpu", "pallas-gpu"), ("cpu", "native"),
                           ("metal", "jnp")]:
        monkeypatch.setattr(backend, "_platform", lambda platform=platform: platform)
        chosen = backend.attention_backend()
        assert (chosen.name, chosen.interpret) == (name, False), platform


def test_override_and_interpret(env):
    for name in ["jnp", "native", "JNP "]:
        env(kernels=name)
        assert backend.attention_backend().name == name.strip().lower()
    env(kernels="pallas-tpu", interpret="1")
    chosen = backend.attention_backend()
    assert (chosen.name, chosen.interpret, chosen.is_pallas) == ("pallas-tpu", True, True)
    env(kernels="native", interpret="1")  # interpret mode concerns Pallas backends only
    assert not backend.attention_backend().interpret


def test_refusals(env):
    env(kernels="triton")
    with pytest.raises(ValueError, match="XLA_INFERENCE_KERNELS='triton'"):
        backend.attention_backend()
    env(kernels="pallas-tpu")  # on the CPU, without interpret mode
    with pytest.raises(RuntimeError, match="XLA_INFERENCE_PALLAS_INTERPRET=1"):
        backend.attention_backend()


def test_a_missing_pallas_module_is_an_error_not_a_fallback(env, monkeypatch):
    monkeypatch.setitem(backend._PALLAS, "pallas-gpu",
                        ("gpu", "xla_inference.kernels.no_such_attention"))
    env(kernels="pallas-gpu", interpret="1")
    chosen = backend.attention_backend()
    with pytest.raises(RuntimeError, match="pallas-gpu is not available"):
        backend.pallas_attention(chosen)
    q, cache, ids, tables = _call_inputs()
    with pytest.raises(RuntimeError, match="no_such_attention does not exist"):
        ragged_paged_attention(q, cache, cache, ids, ids, tables, block_size=16, scale=0.5)


def test_the_choice_is_logged_once(env, caplog, monkeypatch):
    monkeypatch.setattr(backend, "_logged", set())
    env(kernels="jnp")
    with caplog.at_level(logging.INFO, logger=backend.__name__):
        for _ in range(3):
            backend.attention_backend()
    lines = [r.getMessage() for r in caplog.records if "attention kernels" in r.getMessage()]
    assert lines == ["xla-inference: attention kernels: jnp (XLA_INFERENCE_KERNELS)"]


def _call_inputs():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 4, 32)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((4 * 16, 2, 32)), jnp.float32)
    ids = jnp.zeros(4, jnp.int32)
    return q, cache, ids, jnp.asarray([[1, 2]], jnp.int32)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, q, *args, **kwargs):
        self.calls.append(kwargs)
        return jnp.full(q.shape, 7.0, jnp.float32)


@pytest.fixture
def kernels(monkeypatch):
    """Recording stand-ins for the native and the Pallas TPU kernels."""
    recorders = {"native": _Recorder(), "pallas-tpu": _Recorder()}
    monkeypatch.setattr(cpu_attention, "paged_attention", recorders["native"])
    monkeypatch.setattr(pallas_tpu_attention, "paged_attention", recorders["pallas-tpu"])
    return recorders


def test_dispatch_follows_the_backend(env, kernels):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    q, cache, ids, tables = _call_inputs()
    args = (q, cache, cache, ids, jnp.arange(4, dtype=jnp.int32), tables)
    calls = lambda: (len(kernels["native"].calls), len(kernels["pallas-tpu"].calls))  # noqa: E731
    out = ragged_paged_attention(*args, block_size=16, scale=0.5, native=False)
    assert (out.shape, out.dtype, calls()) == (q.shape, q.dtype, (0, 0))
    ragged_paged_attention(*args, block_size=16, scale=0.5)  # auto: native on the CPU
    assert calls() == (1, 0)
    env(kernels="jnp")
    ragged_paged_attention(*args, block_size=16, scale=0.5)
    assert calls() == (1, 0)
    env(kernels="pallas-tpu", interpret="1")
    ragged_paged_attention(*args, block_size=16, scale=0.5, sliding_window=8, soft_cap=30.0,
                           attention_chunk=32, k_scale=0.5, v_scale=2.0)
    assert calls() == (1, 1)
    assert kernels["pallas-tpu"].calls == [dict(
        block_size=16, scale=0.5, sliding_window=8, soft_cap=30.0, attention_chunk=32,
        k_scale=0.5, v_scale=2.0, interpret=True)]
    # native=False stays the jnp reference whatever the backend.
    ragged_paged_attention(*args, block_size=16, scale=0.5, native=False)
    assert calls() == (1, 1)


def test_shared_kv_takes_the_jnp_kernel_under_pallas(env, kernels, caplog, monkeypatch):
    monkeypatch.setattr(backend, "_logged", set())
    q, cache, ids, tables = _call_inputs()
    args = (q, cache[:, :1], None, ids, jnp.arange(4, dtype=jnp.int32), tables)
    env(kernels="pallas-tpu", interpret="1")
    with caplog.at_level(logging.INFO, logger=backend.__name__):
        out = ragged_paged_attention(*args, block_size=16, scale=0.5, shared_kv=True)
    assert out.shape == q.shape
    assert not kernels["pallas-tpu"].calls and not kernels["native"].calls
    assert any("shared K/V" in r.getMessage() for r in caplog.records)


def test_write_and_attend_is_one_call_where_the_backend_has_one(env, kernels, monkeypatch):
    fused = []

    def write_and_attend(q, k_new, v_new, slot_mapping, k_cache, v_cache, *args, **kwargs):
        fused.append(kwargs)
        return k_cache, v_cache, jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(pallas_tpu_attention, "write_and_attend", write_and_attend)
    q, cache, ids, tables = _call_inputs()
    new = cache[:4]
    args = (q, new, new, jnp.arange(16, 20, dtype=jnp.int32), cache, cache, ids,
            jnp.arange(4, dtype=jnp.int32), tables)
    def step(*args):  # a new function each time: a new trace
        return jax.eval_shape(functools.partial(rpa.write_kv_and_attend, block_size=16,
                                                scale=0.5), *args)

    step(*args)  # native: write_kv, then the native kernel
    assert (len(kernels["native"].calls), fused) == (1, [])
    env(kernels="pallas-tpu", interpret="1")
    k_cache, v_cache, out = step(*args)
    assert (k_cache.shape, out.shape) == (cache.shape, q.shape)
    assert fused == [dict(block_size=16, scale=0.5, sliding_window=None, soft_cap=None,
                          attention_chunk=None, k_scale=1.0, v_scale=1.0, interpret=True)]
    assert not kernels["pallas-tpu"].calls and len(kernels["native"].calls) == 1
