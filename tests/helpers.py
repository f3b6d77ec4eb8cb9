"""Shared test utilities: tiny random HF checkpoints and a reference step driver."""

import json
from pathlib import Path

import numpy as np


def save_tiny_llama(path: Path, *, tie: bool = False, rope_scaling: dict | None = None,
                    num_kv_heads: int = 2, seed: int = 0, sharded: bool = False) -> Path:
    """A 2-layer random LlamaForCausalLM saved as a HF checkpoint (float32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_theta=10000.0, rope_scaling=rope_scaling, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so norm bugs show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    save_word_tokenizer(path, config.vocab_size)
    return path


def hf_logits(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """Logits [len, V] of transformers' own implementation, float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([token_ids]))
    return out.logits[0].numpy()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_word_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer "t0 t1 ..." whose ids are the vocabulary of a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                   eos_token="t2")
    fast.save_pretrained(path)


def hf_greedy_ids(model_dir: Path, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """transformers' greedy continuation (float32, EOS ignored) of each prompt."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=num_new, min_new_tokens=num_new,
                                 do_sample=False, pad_token_id=0)
            outputs.append(out[0, len(ids):].tolist())
    return outputs
