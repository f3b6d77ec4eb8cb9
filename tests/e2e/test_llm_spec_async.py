"""Speculative decoding with vLLM's async scheduling (its default for draft_model, eagle,
eagle3 and mtp): vLLM schedules each step before it has the last one's output, with -1
placeholders for the drafts and every draft counted accepted; the runner verifies its own
drafts and subtracts the rejected ones. DeepSeek-V3's MTP layer on the tiny "echo"
checkpoint (most drafts accepted, some not: steps with and without the correction), in
DeepSeek's block-FP8 export, under tensor parallel 2, chunked prefill and preemption:
greedy output equals transformers' greedy output of the target alone (float32, the FP8
weights dequantized), nothing compiles after warm-up. (One engine for the three features,
to keep the suite short; the same runner path serves draft_model, eagle and eagle3, whose
own e2e tests now run with async scheduling too.)"""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.deepseek_mtp_checkpoint import save_fp8_block_copies, save_tiny_deepseek_mtp
from tests.helpers import hf_greedy_ids

pytestmark = pytest.mark.slow

NUM_NEW = 20
K = 3
# One page (16 tokens) of the latent cache [32 + 16] of the target's 3 layers and the MTP
# layer, float32.
PAGE_BYTES = 4 * 16 * 48 * 4


def test_mtp_on_a_block_fp8_target_under_async_scheduling(tmp_path):
    """The target and its MTP layer in DeepSeek's block-FP8 export (the layer's block
    FP8 as the target's layers, eh_proj float), served quantized, under tensor parallel 2
    (virtual CPU devices; the layer split as the target's: tests/runner/test_deepseek_mtp.py)."""
    fp8, reference = save_fp8_block_copies(
        save_tiny_deepseek_mtp(tmp_path / "deepseek", echo=True), tmp_path / "fp8",
        tmp_path / "dequantized")
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    expected = hf_greedy_ids(reference, prompts, NUM_NEW)
    # 7 pages cannot hold the three sequences (2 + 3 + 4 pages at the end): vLLM preempts.
    llm = start_llm(fp8, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96,
                    tensor_parallel_size=2,
                    kv_cache_memory_bytes=7 * PAGE_BYTES,
                    speculative_config={"method": "mtp", "num_speculative_tokens": K})
    try:
        config = llm.llm_engine.vllm_config
        assert config.scheduler_config.async_scheduling  # vLLM's default, kept
        assert config.model_config.quantization == "fp8"
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        preemptions = metric(llm, "vllm:num_preemptions")
        compiled = num_compilations(llm) - warm
        mesh = llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)
    print(f"mtp on fp8, async: {drafted:.0f} drafted, {accepted:.0f} accepted")
    assert mesh["model"] == 2  # the target and its MTP layer split over 2 devices
    assert got == expected
    # Most drafts accepted (the FP8 layer drafts what the target predicts), not all: steps
    # with rejections, whose count the runner subtracts from vLLM's optimistic one.
    assert drafted > accepted > drafted / 2
    assert preemptions > 0
    assert compiled == 0
