"""Quantized checkpoints served through the Pallas quantized matmul
(kernels/pallas_quantized_matmul.py), forced on this CPU with XLA_INFERENCE_QMM_BACKEND=tpu
or gpu (Pallas interpret mode; attention stays the CPU's):

- the projections are stored at load in the kernel's K-major layout (packed.K_MAJOR), and a
  tiny quantized Llama's step logits (a prefill, a chunked prefill, a decode step) equal
  the default CPU path's (the native kernel's tiles), for an int4 group format, int8 (W8A8,
  int8 activations) and FP8 block scales;
- a recording wrapper proves the kernel multiplied every projection of every layer, and
  the traced product hands the stored arrays to the kernel with no operation between
  (no per-step transpose or unpacking of the weight);
- over 2 virtual devices (tensor parallel) the values and scales in that layout are split
  along their weight's axes and the logits equal one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.extend.core import Literal

from tests.helpers import ENGINE_BLOCK, engine_request, run_chunks
from tests.quantization.checkpoints import NUM_LAYERS, PROJECTIONS
from xla_inference.kernels import pallas_quantized_matmul as qmm
from xla_inference.parallel.sharding import build_mesh
from xla_inference.quantization.groups import FP8, INT4, INT8, GroupQuant
from xla_inference.quantization.packed import K_MAJOR, OUT_IN, PackedWeight, pack
from xla_inference.quantization.product import quantized_project

pytestmark = pytest.mark.slow

PLAN = [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}]  # prefill, chunked prefill, decode
# As tests/quantization/test_checkpoint_logits.py: the CPU path quantizes decode rows to
# 15 bits (and W8A8's int8 rounding may flip one step at a .5 boundary).
TOL = 2e-3
W8A8_TOL = 5e-3


@pytest.fixture
def recorded_qmm(monkeypatch):
    """Every quantized_matmul call's (backend, interpret, values shape, dtype) while the
    test runs (recorded when a step is traced)."""
    calls = []
    kernel = qmm.quantized_matmul

    def recording(x, values, *args, **kwargs):
        calls.append((kwargs["backend"], kwargs["interpret"], values.shape, values.dtype))
        return kernel(x, values, *args, **kwargs)

    monkeypatch.setattr(qmm, "quantized_matmul", recording)
    return calls


def _step_logits(model_dir, mesh=None):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    jax.clear_caches()  # the route is read when a layer is traced; decoder's jit outlives engines
    model = load(model_dir, Precision.uniform(jnp.float32))
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    engine = build_engine(model, ecfg, mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (11, 23, 14)]
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
    return engine, run_chunks(engine, reqs, PLAN)


@pytest.fixture(scope="module")
def one_device_logits():
    """(checkpoint, backend or "cpu") -> one device's logits, computed once per module."""
    return {}


def _cpu_logits(name, model_dir, monkeypatch, cache):
    if (name, "cpu") not in cache:
        monkeypatch.delenv(qmm.QMM_BACKEND_VARIABLE, raising=False)
        assert qmm.quantized_matmul_route() is None  # the CPU: native kernel / XLA's product
        engine, cache[name, "cpu"] = _step_logits(model_dir)
        assert engine.params.layers[0].attn.wq.layout == OUT_IN
    return cache[name, "cpu"]


def _projections(engine):
    for layer in engine.params.layers:
        yield from (layer.attn.wq, layer.attn.wk, layer.attn.wv, layer.attn.wo,
                    layer.mlp.w_gate, layer.mlp.w_up, layer.mlp.w_down)


# checkpoint -> (kind, a backend); the other backend runs the int4 checkpoint too.
CASES = [("gptq-4bit-asym", "tpu"), ("gptq-4bit-asym", "gpu"), ("ct-w8a8", "tpu"),
         ("ct-fp8-block", "gpu")]
KINDS = {"gptq-4bit-asym": INT4, "ct-w8a8": INT8, "ct-fp8-block": FP8}


@pytest.mark.parametrize("name,backend", CASES)
def test_checkpoint_step_through_pallas_matches_cpu(name, backend, quantized_checkpoint,
                                                    monkeypatch, recorded_qmm,
                                                    one_device_logits):
    path = quantized_checkpoint(name).path
    want = _cpu_logits(name, path, monkeypatch, one_device_logits)
    assert recorded_qmm == []
    monkeypatch.setenv(qmm.QMM_BACKEND_VARIABLE, backend)
    engine, got = _step_logits(path)
    one_device_logits[name, backend] = got
    for w in _projections(engine):
        assert w.layout == K_MAJOR and w.kind == KINDS[name]
        rows = w.in_features // 2 if w.kind == INT4 else w.in_features
        assert w.values.shape == (rows, w.out_features)
    # Every projection of every layer, once per traced bucket (the plan's two buckets).
    per_trace = NUM_LAYERS * len(PROJECTIONS)
    assert len(recorded_qmm) % per_trace == 0 and len(recorded_qmm) >= per_trace
    assert {(b, i) for b, i, _, _ in recorded_qmm} == {(backend, True)}
    stored = {(w.values.shape, w.values.dtype) for w in _projections(engine)}
    assert {(shape, dtype) for _, _, shape, dtype in recorded_qmm} == stored
    tol = W8A8_TOL if name == "ct-w8a8" else TOL
    assert got.keys() == want.keys()
    for key, logits in want.items():
        np.testing.assert_allclose(got[key], logits, rtol=tol, atol=tol, err_msg=str(key))


def _int4_weight(accelerator) -> PackedWeight:
    rng = np.random.default_rng(0)
    quant = GroupQuant(rng.integers(0, 16, (96, 256)).astype(np.uint8),
                       rng.uniform(0.01, 0.05, (96, 8)).astype(np.float32),
                       rng.uniform(-0.2, 0.2, (96, 8)).astype(np.float32), INT4, 32)
    return pack(quant, accelerator=accelerator), quant


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_traced_product_hands_stored_arrays_to_the_kernel(backend, monkeypatch):
    """The step's product reads the weight as stored: every operation that takes one of the
    weight's arrays is the Pallas call itself (no transpose, unpacking or copy first)."""
    monkeypatch.setenv(qmm.QMM_BACKEND_VARIABLE, backend)
    w, quant = _int4_weight(backend)
    assert w.layout == K_MAJOR and w.values.shape == (128, 96) and w.scales.shape == (8, 96)
    x = jax.random.normal(jax.random.key(0), (5, 256))
    jaxpr = jax.make_jaxpr(quantized_project)(x, w).jaxpr
    weight_vars = set(jaxpr.invars[1:])  # x, then values, scales, offsets
    readers = [e.primitive.name for e in jaxpr.eqns
               if any(v in weight_vars for v in e.invars if not isinstance(v, Literal))]
    assert readers == ["pallas_call"]
    want = np.asarray(x, np.float64) @ quant.dequantize().T
    np.testing.assert_allclose(quantized_project(x, w), want, rtol=1e-5, atol=1e-5)


def test_weights_the_kernels_do_not_take_keep_the_cpu_layout():
    """pack stores the K-major layout only where the chosen kernel takes the weight: a
    Triton segment must be a power of two of at least 16 inputs (groups of 8 are not)."""
    rng = np.random.default_rng(0)
    quant = GroupQuant(rng.integers(0, 16, (32, 64)).astype(np.uint8),
                       rng.uniform(0.01, 0.05, (32, 8)).astype(np.float32), None, INT4, 8)
    assert pack(quant, accelerator="gpu").layout == OUT_IN
    assert pack(quant, accelerator="tpu").layout == K_MAJOR
    assert pack(quant).layout == OUT_IN


# The values each kernel call multiplies under TP 2 (a device's share): column parallel
# projections (q, k, v, gate, up) split their outputs; row parallel ones (o, down) their
# inputs, where a share keeps whole groups and (4 bits) whole 2H-input blocks. The tiny
# Llama's 4-bit o (K = 128, H = 64) and down (K = 256, H = 128) would cut their blocks:
# those two run whole, as GSPMD partitions them (their shapes: (64, 128), (128, 128)).
TP_SHARES = {
    # W8A8: one scale a channel, packed as groups of 128: o (K = 128) runs whole.
    "ct-w8a8": {(128, 64), (128, 32), (128, 128)},
    "gptq-4bit-asym": {(64, 64), (64, 32), (64, 128), (128, 128)},
}


@pytest.mark.parametrize("name,backend", [("ct-w8a8", "tpu"), ("gptq-4bit-asym", "gpu")])
def test_tensor_parallel_through_pallas_equals_one_device(name, backend, quantized_checkpoint,
                                                          monkeypatch, recorded_qmm,
                                                          one_device_logits):
    assert len(jax.devices()) >= 2
    path = quantized_checkpoint(name).path
    monkeypatch.setenv(qmm.QMM_BACKEND_VARIABLE, backend)
    if (name, backend) not in one_device_logits:  # this test alone (-k)
        one_device_logits[name, backend] = _step_logits(path)[1]
    single = one_device_logits[name, backend]
    recorded_qmm.clear()
    engine, sharded = _step_logits(path, build_mesh(2))
    assert {shape for _, _, shape, _ in recorded_qmm} == TP_SHARES[name]
    # W8A8: another summation order may move an activation across a .5 rounding boundary
    # (one int8 step of one input), as in test_checkpoint_logits.py.
    tol = W8A8_TOL if name == "ct-w8a8" else 1e-5
    for key, row in single.items():
        np.testing.assert_allclose(sharded[key], row, rtol=tol, atol=tol, err_msg=str(key))
    layer = engine.params.layers[0]
    # Column parallel (wq: [embed, heads] stored): the output axis splits; row parallel
    # (w_down: [mlp, embed] stored): the input axis splits.
    for w, axis in ((layer.attn.wq, 1), (layer.mlp.w_up, 1), (layer.mlp.w_down, 0)):
        assert w.layout == K_MAJOR and w.tensor_split == axis
        for arr in (w.values, w.scales, w.offsets):
            if arr is None:
                continue
            assert arr.sharding.spec[axis] == "model", (arr.shape, arr.sharding.spec)
            for shard in arr.addressable_shards:
                assert shard.data.shape[axis] == arr.shape[axis] // 2
