"""Tiny random pooling checkpoints (an embedding Qwen3, a Llama classifier) and
transformers' pooled outputs over them, the reference for tests/runner/test_pooling.py and
tests/e2e/test_llm_pooling.py."""

from pathlib import Path

import numpy as np

from tests.helpers import save_word_tokenizer


def _randomize_norms(model) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))


def save_tiny_qwen3_embedder(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Qwen3 saved as Qwen3-Embedding ships: the bare decoder's tensors
    (no `model.` prefix, no LM head) under architecture Qwen3ForCausalLM."""
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(config).to(torch.float32).eval()
    _randomize_norms(model)
    model.config.architectures = ["Qwen3ForCausalLM"]
    model.config.is_matryoshka = True  # vLLM then serves `dimensions` (truncation)
    model.save_pretrained(path)
    save_word_tokenizer(path, config.vocab_size)
    return path


def save_tiny_llama_classifier(path: Path, num_labels: int = 3, seed: int = 0) -> Path:
    """A 2-layer random LlamaForSequenceClassification (score layer [labels, 64])."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_labels=num_labels)
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(config).to(torch.float32).eval()
    _randomize_norms(model)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.3)
    model.save_pretrained(path)
    save_word_tokenizer(path, config.vocab_size)
    return path


def hf_last_hidden(path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """transformers' final (normed) hidden states [P, D] of each prompt, float32, one by one."""
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    base = getattr(model, "model", model)
    out = []
    with torch.no_grad():
        for ids in prompts:
            h = base(input_ids=torch.tensor([ids])).last_hidden_state[0]
            out.append(h.double().numpy())
    return out


def hf_classify_logits(path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """transformers' sequence-classification logits of each prompt (its last token)."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in prompts]


def hf_token_logits(path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """transformers' classification logits of every token [P, labels] (its score layer
    over each token's final hidden state; the model itself reads the last one)."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state)[0]
                .double().numpy() for ids in prompts]


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
