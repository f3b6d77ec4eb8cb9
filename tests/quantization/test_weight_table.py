"""Quantized weights named by address (quantization/weight_table.py): on the host CPU, an
engine's steps of a few tokens take one small table in place of the quantized weights'
arrays. The logits are the bits of the engine that passes every array
(XLA_INFERENCE_WEIGHT_TABLE=0), over prefill, chunked prefill and decode steps; a model that
reads such a weight as an array keeps its arrays as arguments."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, RecordedProgram, engine_request, run_chunks
from xla_inference.kernels import cpu_quantized
from xla_inference.quantization import product, weight_table

PLAN = [{0: 11, 1: 9, 2: 13}, {1: 14, 2: 1}, {0: 1, 1: 1, 2: 1}, {0: 1, 2: 1}]


def _engine(model_dir, monkeypatch, by_address: bool):
    from xla_inference.runner.build import Precision, build_engine, load
    from xla_inference.runner.engine import EngineConfig

    monkeypatch.setenv("XLA_INFERENCE_WEIGHT_TABLE", "1" if by_address else "0")
    model = load(model_dir, Precision.uniform(jnp.float32))
    ecfg = EngineConfig(num_blocks=64, block_size=ENGINE_BLOCK, max_num_tokens=64,
                        max_num_seqs=8, max_model_len=128)
    return build_engine(model, ecfg)


def _logits(engine) -> dict:
    rng = np.random.default_rng(0)
    reqs = [engine_request(f"r{i}", rng.integers(0, 128, size=n).tolist(), 1 + 8 * i)
            for i, n in enumerate((14, 24, 16))]
    return run_chunks(engine, reqs, PLAN)


@pytest.mark.parametrize("name", ["awq-g32", "gptq-4bit-sym", "ct-w8a8"])
def test_steps_by_address_have_the_passed_weights_bits(name, quantized_checkpoint,
                                                       monkeypatch):
    """AWQ (offsets), GPTQ (a zero point, no offsets) and W8A8 (int8 activations): each
    step's logits equal the engine's that passes the arrays, bit for bit; the few-token
    steps ran the table program, which takes a fraction of the arrays."""
    assert cpu_quantized.available()
    path = quantized_checkpoint(name).path
    passed = _engine(path, monkeypatch, by_address=False)
    assert passed._forward_table is None
    by_address = _engine(path, monkeypatch, by_address=True)
    leaves, table = by_address._table_params
    assert table.dtype == jnp.uint8 and table.shape[1] == 8 * cpu_quantized.TABLE_COLUMNS
    assert len(leaves) < len(by_address._param_leaves) / 2
    most = weight_table.max_rows()
    assert by_address._by_address(most) and not by_address._by_address(most + 1)
    ran = []
    by_address._forward_table = RecordedProgram(
        by_address._forward_table, lambda args: ran.append(args[2].input_ids.shape))
    want = _logits(passed)
    got = _logits(by_address)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    # the steps of at most max_rows() tokens (buckets 16 and 4, 2); the 33-token one not
    assert ran == [(T,) for T in (16, 4, 2) if T <= most]


@pytest.mark.slow
def test_a_model_reading_a_weight_as_an_array_keeps_its_arrays(quantized_checkpoint,
                                                               monkeypatch, caplog):
    """A product that reads a table-named weight as an array (here the kernel's calls,
    every projection of a decoder layer's decode step, patched to) fails its trace at
    warm-up: the engine then passes every array, says so, and serves the same logits."""
    caplog.set_level("WARNING")
    path = quantized_checkpoint("awq-g32").path
    want = _logits(_engine(path, monkeypatch, by_address=False))
    reading = product._kernel_products

    def reads_the_array(x2, ws, *args):
        jnp.asarray(ws[0].values)  # as a model outside the kernel's entries would
        return reading(x2, ws, *args)

    monkeypatch.setattr(product, "_kernel_products", reads_the_array)
    engine = _engine(path, monkeypatch, by_address=True)
    assert engine._forward_table is not None
    engine.warm_up()
    assert engine._forward_table is None
    assert "stay program arguments" in caplog.text
    got = _logits(engine)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
