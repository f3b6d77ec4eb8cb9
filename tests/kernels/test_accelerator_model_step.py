"""A whole model step with each accelerator's attention backend forced on this CPU
(XLA_INFERENCE_KERNELS=pallas-tpu / pallas-gpu, XLA_INFERENCE_PALLAS_INTERPRET=1) gives
the logits of the native CPU kernel's step, for a tiny Llama and a tiny Qwen3-MoE.

Two steps per engine, both in the 16-token bucket (one compilation each): a prefill of
two requests (one cut short: chunked prefill), then a mixed step with a decode-like single
token over its cached context, the second chunk of the chunked request and a fresh
prefill. A recording wrapper around the backend's kernel proves that it served the
attention layers (traced once, with interpret mode on).
"""

import jax
import numpy as np
import pytest

from tests.helpers import engine_request, run_chunks, save_tiny_family, save_tiny_llama, tiny_engine
from xla_inference.kernels import backend

pytestmark = pytest.mark.slow

ACCELERATOR_BACKENDS = ["pallas-tpu", "pallas-gpu"]
PROMPTS = [[5, 9, 14, 3, 77, 21, 40, 8], list(range(20, 34)), [101, 7, 66]]
PLAN = [{0: 7, 1: 5}, {0: 1, 1: 9, 2: 3}]


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("accelerator_step") / request.param
    if request.param == "llama":
        return save_tiny_llama(path)
    return save_tiny_family(path, "qwen3_moe")


def _step_logits(model_dir) -> dict:
    # The backend is chosen when the step is traced, and JAX keeps traces of the layer
    # body (a scan over layers) across engines: start from no traces, as a process does.
    jax.clear_caches()
    engine = tiny_engine(model_dir)
    reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(PROMPTS)]
    return run_chunks(engine, reqs, PLAN)


@pytest.fixture(scope="module")
def native_logits(model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_INFERENCE_KERNELS", "native")
        return _step_logits(model_dir)


@pytest.mark.parametrize("name", ACCELERATOR_BACKENDS)
def test_forced_backend_step_matches_native(model_dir, native_logits, name, monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_KERNELS", name)
    monkeypatch.setenv("XLA_INFERENCE_PALLAS_INTERPRET", "1")
    chosen = backend.attention_backend()
    assert (chosen.name, chosen.interpret) == (name, True)
    # The layers call the backend's fused write-and-attend kernel where it has one
    # (pallas-tpu), else its paged_attention after write_kv: record whichever serves.
    fused = backend.pallas_write_and_attend(chosen)
    kernel = fused if fused is not None else backend.pallas_attention(chosen)
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs["interpret"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(f"{kernel.__module__}.{kernel.__name__}", recording)
    got = _step_logits(model_dir)
    # The 16-token bucket traced once; its layers share a scanned body (one call per
    # distinct layer kind).
    assert calls and all(calls)
    assert got.keys() == native_logits.keys()
    for key, want in native_logits.items():
        np.testing.assert_allclose(got[key], want, rtol=2e-4, atol=2e-4, err_msg=str(key))
