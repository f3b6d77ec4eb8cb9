"""--kv-cache-dtype fp8 through vllm.LLM on a tiny random Qwen3 (float32 weights).

Our engine with an fp8 (e4m3) KV cache greedily produces the tokens of kv_cache_dtype
auto (a float32 cache with dtype float32), and fits four times the pages into the same
memory: vLLM counts them from the 1-byte page size the worker reports. fp8_e5m2 too
(two mantissa bits: only its first token is compared).

The kernels' fp8 arithmetic is checked exactly in tests/kernels/test_fp8_kv_cache.py.
vLLM's own CPU backend is no token-exact reference here: with fp8 it strays further from
its float32 cache (0.035 in top-5 logprobs over these prompts) than ours does (0.010), and
its first tokens already differ from both."""

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 16
AGREE = 8  # tokens the fp8 and float32 caches must agree on
KV_BYTES = 4 << 20


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(9)
    return [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 40, 11)]


def _llm_args(model_dir, kv_cache_dtype: str) -> dict:
    return dict(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=32, kv_cache_memory_bytes=KV_BYTES, seed=0,
                kv_cache_dtype=kv_cache_dtype)


def _greedy(llm) -> list[list[int]]:
    from tests.e2e.engines import generate_ids

    return generate_ids(llm, _prompts(), max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers import save_tiny_family

    # head_dim 32: vLLM's CPU attention needs at least that.
    return save_tiny_family(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


def _ours(model_dir, kv_cache_dtype: str) -> tuple[list[list[int]], int]:
    """(greedy tokens, KV cache pages vLLM counted) through our platform."""
    from tests.e2e.engines import shutdown, start_llm

    llm = start_llm(model_dir, **_llm_args(model_dir, kv_cache_dtype))
    try:
        return _greedy(llm), llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def auto(model_dir):
    return _ours(model_dir, "auto")


@pytest.fixture(scope="module")
def fp8(model_dir):
    return _ours(model_dir, "fp8")


def test_fp8_greedy_matches_kv_cache_auto(auto, fp8):
    # A random model's logits lie close together: fp8's rounding of K/V (about 3%) may flip
    # a later token, so only the first ones are compared.
    assert [t[:AGREE] for t in fp8[0]] == [t[:AGREE] for t in auto[0]]
    assert all(len(tokens) == NUM_NEW for tokens in fp8[0])


def test_fp8_fits_four_times_the_pages_of_float32(auto, fp8):
    # Same kv_cache_memory_bytes: one byte per value instead of float32's four.
    assert fp8[1] == 4 * auto[1], (fp8[1], auto[1])


def test_fp8_e5m2_runs_with_four_times_the_pages(model_dir, auto):
    tokens, pages = _ours(model_dir, "fp8_e5m2")
    assert pages == 4 * auto[1]
    assert [t[:1] for t in tokens] == [t[:1] for t in auto[0]]


def test_other_kv_cache_dtypes_are_refused_naming_the_choices(model_dir):
    from tests.e2e.engines import start_llm

    with pytest.raises(Exception, match="fp8_e5m2"):
        start_llm(model_dir, **_llm_args(model_dir, "int8_per_token_head"))
