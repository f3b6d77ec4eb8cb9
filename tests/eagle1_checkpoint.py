"""A tiny random EAGLE-1 Llama head saved with vLLM's weight names and config (`fc`,
`layers.{i}.*` with no input norm in layer 0, no LM head: the target's), and a float64
numpy reference of the head."""

import json
from pathlib import Path

import numpy as np

from tests.eagle3_checkpoint import EPS, FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, THETA, VOCAB
from tests.eagle3_checkpoint import NumpyEagle3

NUM_LAYERS = 2


def save_tiny_eagle1(path: Path, *, seed: int = 0, with_embed: bool = False,
                     echo: bool = False, scale: float = 0.3) -> Path:
    """echo: fc passes the target's hidden state through and the layers add little, so the
    head mostly proposes what the target predicted at the position before (right on a
    target stuck repeating one token)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    D, NH, KH = HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def w(*shape):
        return (3 * scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    tensors = {"fc.weight": w(D, 2 * D)}
    for i in range(NUM_LAYERS):
        p = f"layers.{i}."
        if i > 0:
            tensors[p + "input_layernorm.weight"] = norm()
        tensors.update({
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(NH, D), p + "self_attn.k_proj.weight": w(KH, D),
            p + "self_attn.v_proj.weight": w(KH, D), p + "self_attn.o_proj.weight": w(D, NH),
            p + "mlp.gate_proj.weight": w(FFN, D), p + "mlp.up_proj.weight": w(FFN, D),
            p + "mlp.down_proj.weight": w(D, FFN)})
        if echo:
            tensors[p + "self_attn.o_proj.weight"] *= 0.05
            tensors[p + "mlp.down_proj.weight"] *= 0.05
    if echo:
        tensors["fc.weight"][:] = 0
        tensors["fc.weight"][:, D:] = np.eye(D)
    if with_embed:
        tensors["embed_tokens.weight"] = rng.standard_normal((VOCAB, D)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
        "intermediate_size": FFN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "num_hidden_layers": NUM_LAYERS, "rms_norm_eps": EPS,
        "rope_theta": THETA, "vocab_size": VOCAB, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


class NumpyEagle1:
    """The head in float64: its tensors, the target's embedding (if it has none) and LM head."""

    def __init__(self, path: Path, target_embed: np.ndarray, target_lm_head: np.ndarray):
        from safetensors.numpy import load_file

        self.t = {k: v.astype(np.float64) for k, v in load_file(str(path / "model.safetensors")).items()}
        self.embed = self.t.get("embed_tokens.weight", target_embed)
        self.lm_head = target_lm_head

    def _attention(self, x, p):
        t, T = self.t, len(x)
        q = (x @ t[p + "self_attn.q_proj.weight"].T).reshape(T, HEADS, HEAD_DIM)
        k = (x @ t[p + "self_attn.k_proj.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        pos = np.arange(T, dtype=np.float64)
        q, k = NumpyEagle3._rope(q, pos), NumpyEagle3._rope(k, pos)
        k, v = np.repeat(k, HEADS // KV_HEADS, 1), np.repeat(v, HEADS // KV_HEADS, 1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HEAD_DIM)
        scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.einsum("hqk,khd->qhd", probs, v).reshape(T, -1) @ t[p + "self_attn.o_proj.weight"].T

    def layers(self, tokens, hidden):
        t = self.t
        x = np.concatenate([self.embed[np.asarray(tokens)], hidden], -1) @ t["fc.weight"].T
        for i in range(NUM_LAYERS):
            p = f"layers.{i}."
            h = x if i == 0 else NumpyEagle3._norm(x, t[p + "input_layernorm.weight"])
            x = x + self._attention(h, p)
            m = NumpyEagle3._norm(x, t[p + "post_attention_layernorm.weight"])
            gate = m @ t[p + "mlp.gate_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * (m @ t[p + "mlp.up_proj.weight"].T)) @ \
                t[p + "mlp.down_proj.weight"].T
        return x

    def propose(self, token_ids: list[int], target_hidden: np.ndarray, k: int) -> list[int]:
        """Drafts after N tokens, the target's final hidden states [N - 1, D] given."""
        tokens, hidden, drafts = list(token_ids[1:]), target_hidden, []
        for _ in range(k):
            x = self.layers(tokens, hidden)
            drafts.append(int(np.argmax(self.lm_head @ x[-1])))
            tokens.append(drafts[-1])
            hidden = np.concatenate([hidden, x[-1:]])
        return drafts
