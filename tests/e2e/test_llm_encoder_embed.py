"""An encoder-only (bidirectional) embedder through vllm.LLM on our platform: a tiny random
BertModel saved as a sentence-transformers embedder (MEAN pooling, Normalize), served by
vLLM's BertEmbeddingModel on the torch path with cache-free bidirectional attention
(torch_models/attention.EncoderOnlyAttentionForward). Four prompts of mixed lengths fill
every row of a step (its padding carries the last row's id): sentence embeddings within
1e-4 of transformers' mean-pooled, normalized hidden states; they and the embedding scores
of a query against documents equal vLLM's own CPU backend (VLLM_PLUGINS=none, a
subprocess) on the same checkpoint; nothing compiles after warm-up. A BERT cross-encoder
(BertForSequenceClassification) is refused by name. A tiny XLM-RoBERTa (vLLM's
RobertaEmbeddingModel: CLS pooling by default, positions past the padding id) matches
transformers' first-token states, normalized."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import save_word_tokenizer

pytestmark = pytest.mark.slow

# 4 prompts, max_num_seqs 4: one step of every row (71 tokens in the 128-token bucket).
PROMPTS = [[5, 9, 3, 7, 11], list(range(3, 43)), [40, 41, 42, 8, 9, 10, 99, 1, 4],
           [101, 7, 7, 20, 64, 3, 90, 12, 33, 45, 6, 100, 2, 77, 18, 9, 54]]
QUERY, DOCS = "t5 t6 t7", ["t8 t9", "t3 t4 t5 t6 t7", "t5 t6 t7"]
TOL = 1e-4
_ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize",
     "type": "sentence_transformers.models.Normalize"}]


def _tiny_bert_config(**extra):
    import transformers

    return transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=128, type_vocab_size=2, **extra)


def _randomize(model) -> None:
    """LayerNorms away from 1/0 and embeddings wider than the init's 0.02, so that every
    weight shows in the output."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_(0.0, 0.5)


def save_tiny_bert_embedder(path: Path, seed: int = 0) -> Path:
    """A 2-layer random BertModel (hidden 64) with sentence-transformers' modules.json:
    the transformer, MEAN pooling, normalization (what vLLM reads for its pooler config)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertModel(_tiny_bert_config(), add_pooling_layer=False).eval()
    _randomize(model)
    model.save_pretrained(path)
    save_word_tokenizer(path, 128)
    (path / "modules.json").write_text(json.dumps(_ST_MODULES))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    (path / "2_Normalize").mkdir()
    return path


def hf_hidden(path: Path, prompts) -> list[np.ndarray]:
    """transformers' final hidden states [P, D] of each prompt alone (token types 0)."""
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).last_hidden_state[0].double().numpy()
                for p in prompts]


def _normalized(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _llm_args(model_dir) -> dict:
    # Encoder-only: vLLM turns chunked prefill and prefix caching off, so every prompt is
    # scheduled whole; a step holds up to 128 tokens.
    return dict(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=128, kv_cache_memory_bytes=4 << 20, seed=0,
                runner="pooling")


def _run(llm) -> dict:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return dict(
        embed=[o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)],
        score=[o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)])


def _reference_main(model_dir: str, out_path: str) -> None:
    from tests.e2e.engines import shutdown
    from vllm import LLM

    llm = LLM(**_llm_args(model_dir), enforce_eager=True)
    out = _run(llm)
    shutdown(llm)  # its engine processes hold the pipes the test reads until they end
    Path(out_path).write_text(json.dumps(out))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert_embedder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    from tests.e2e.engines import vllm_cpu_reference

    out = tmp_path_factory.mktemp("reference") / "vllm_cpu.json"
    return vllm_cpu_reference("tests.e2e.test_llm_encoder_embed", [model_dir], out)


@pytest.fixture(scope="module")
def ours(model_dir):
    from tests.e2e.engines import num_compilations, shutdown
    from vllm import LLM

    llm = LLM(**_llm_args(model_dir))
    try:
        compiled = num_compilations(llm)
        out = _run(llm)
        out["recompiled"] = num_compilations(llm) - compiled
        out["kv_groups"] = llm.collective_rpc("kv_cache_groups")[0]["num_groups"]
    finally:
        shutdown(llm)
    return out


def test_bert_embeddings_match_transformers_and_vllm_cpu(model_dir, ours, reference):
    hidden = hf_hidden(model_dir, PROMPTS)
    for i, h in enumerate(hidden):
        np.testing.assert_allclose(ours["embed"][i], _normalized(h.mean(axis=0)),
                                   atol=TOL, rtol=TOL)
    for key in ("embed", "score"):
        for got, want in zip(ours[key], reference[key]):
            np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    assert np.argmax(ours["score"]) == 2  # the identical document scores highest
    assert ours["kv_groups"] == 0  # encoder-only layers keep no KV cache
    assert ours["recompiled"] == 0


def save_tiny_xlm_roberta(path: Path, seed: int = 1) -> Path:
    """A 2-layer random XLMRobertaModel, no sentence-transformers modules: vLLM's default
    for it, CLS pooling, normalized. Its positions start past the padding id (0 here)."""
    import torch
    import transformers

    config = transformers.XLMRobertaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=130, type_vocab_size=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
        position_embedding_type="absolute")  # as real checkpoints' config.json say; vLLM reads it
    torch.manual_seed(seed)
    model = transformers.XLMRobertaModel(config, add_pooling_layer=False).eval()
    _randomize(model)
    model.save_pretrained(path)
    save_word_tokenizer(path, 128)
    return path


def test_xlm_roberta_cls_embeddings_match_transformers(tmp_path):
    """CLS pooling (the first token's state) and RoBERTa's shifted positions; no prompt
    holds the padding id 0, so transformers' positions are 1.. as well."""
    import torch
    import transformers

    from tests.e2e.engines import shutdown
    from vllm import LLM

    model_dir = save_tiny_xlm_roberta(tmp_path / "xlmr")
    model = transformers.XLMRobertaModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = [_normalized(model(input_ids=torch.tensor([p])).last_hidden_state[0, 0]
                                .double().numpy()) for p in PROMPTS]
    llm = LLM(**_llm_args(model_dir))
    try:
        got = [o.outputs.embedding for o in llm.embed(
            [{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)]
    finally:
        shutdown(llm)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=TOL, rtol=TOL)


def test_bert_cross_encoder_is_refused_by_name(tmp_path):
    import jax.numpy as jnp
    import torch
    import transformers

    from tests.torch_models.conftest import vllm_config
    from xla_inference.runner.build import Precision
    from xla_inference.torch_models.errors import TorchPathError
    from xla_inference.torch_models.loader import load

    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_tiny_bert_config(num_labels=1)).save_pretrained(
        tmp_path)
    save_word_tokenizer(tmp_path, 128)
    with pytest.raises(TorchPathError, match=r"pooling model class "
                       r"BertForSequenceClassification .*cross-encoders"):
        load(vllm_config(tmp_path, runner="pooling", max_num_batched_tokens=128),
             Precision.uniform(jnp.float32))


if __name__ == "__main__":
    # Its one engine's core in this process (as eagle3_run's): no second process importing
    # vLLM and torch again.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    _reference_main(*sys.argv[1:3])
    sys.stdout.flush()
    os._exit(0)  # the answer is written; skip interpreter-exit teardown of vLLM's threads
