"""A tiny random EAGLE-3 Llama head saved with vLLM's weight names and config
(LlamaForCausalLMEagle3: `midlayer.*`, `fc`, `norm`, `lm_head` over a draft vocabulary,
`d2t` offsets and the `t2d` mask), and a float64 numpy reference of the head."""

import json
from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 32, 96  # head_dim 32: vLLM CPU needs it
VOCAB, DRAFT_VOCAB, EPS, THETA = 128, 96, 1e-5, 10000.0


def save_tiny_eagle3(path: Path, aux_layer_ids=(0, 1, 2), *, seed: int = 0,
                     with_embed: bool = True, draft_vocab: int = DRAFT_VOCAB,
                     scale: float = 0.3, echo_embed: np.ndarray | None = None) -> Path:
    """A random head for a target of hidden size 64 and 128 tokens (save_tiny_llama_target);
    draft ids map to a random sorted subset of the target's ids.

    echo_embed: the target's embedding [V, D]. The head then mostly proposes the token
    before the last (its fc passes aux layer 0, the target's embedding at p, through; the
    layer adds little; its LM head is that embedding's rows): right one draft in two on a
    target caught in a two-token loop, so that some drafts are accepted, some rejected."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    D, NH, KH = HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    n_aux = len(aux_layer_ids)

    def w(*shape):
        return (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    targets = np.sort(rng.choice(VOCAB, size=draft_vocab, replace=False))
    t2d = np.zeros(VOCAB, bool)
    t2d[targets] = True
    tensors = {
        "fc.weight": w(D, n_aux * D) * 3,
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": w(NH, 2 * D) * 3,
        "midlayer.self_attn.k_proj.weight": w(KH, 2 * D) * 3,
        "midlayer.self_attn.v_proj.weight": w(KH, 2 * D) * 3,
        "midlayer.self_attn.o_proj.weight": w(D, NH) * 3,
        "midlayer.mlp.gate_proj.weight": w(FFN, D) * 3,
        "midlayer.mlp.up_proj.weight": w(FFN, D) * 3,
        "midlayer.mlp.down_proj.weight": w(D, FFN) * 3,
        "norm.weight": norm(),
        "lm_head.weight": w(draft_vocab, D) * 10,
        "d2t": (targets - np.arange(draft_vocab)).astype(np.int64),
        "t2d": t2d,
    }
    if echo_embed is not None:
        assert aux_layer_ids[0] == 0
        tensors["fc.weight"][:] = 0
        tensors["fc.weight"][:, :D] = np.eye(D)
        for name in ("midlayer.self_attn.o_proj.weight", "midlayer.mlp.down_proj.weight"):
            tensors[name] *= 0.05
        tensors["lm_head.weight"] = echo_embed[targets].astype(np.float32)
    if with_embed:
        tensors["embed_tokens.weight"] = rng.standard_normal((VOCAB, D)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": D, "intermediate_size": FFN, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "num_hidden_layers": 1,
        "rms_norm_eps": EPS, "rope_theta": THETA, "vocab_size": VOCAB,
        "draft_vocab_size": draft_vocab, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
                         "use_aux_hidden_state": True},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


class NumpyEagle3:
    """The head in float64, from the checkpoint's tensors."""

    def __init__(self, path: Path, target_embed: np.ndarray | None = None):
        from safetensors.numpy import load_file

        t = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
             for k, v in load_file(str(path / "model.safetensors")).items()}
        self.t = t
        self.embed = t.get("embed_tokens.weight", target_embed)
        self.d2t = np.arange(len(t["d2t"])) + t["d2t"]

    @staticmethod
    def _norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)

    @staticmethod
    def _rope(x, positions):
        """x [T, H, hd], rotate-half (HF Llama)."""
        half = HEAD_DIM // 2
        inv = 1.0 / THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        ang = positions[:, None] * inv[None]  # [T, half]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def layer(self, tokens, hidden):
        """tokens [T] (at p + 1) and h [T, D] for positions 0..T-1 of one sequence ->
        (normed [T, D], pre-norm [T, D]), causal attention over them."""
        t, p = self.t, "midlayer."
        T = len(tokens)
        e = self._norm(self.embed[np.asarray(tokens)], t[p + "input_layernorm.weight"])
        hn = self._norm(hidden, t[p + "hidden_norm.weight"])
        x = np.concatenate([e, hn], axis=-1)
        q = (x @ t[p + "self_attn.q_proj.weight"].T).reshape(T, HEADS, HEAD_DIM)
        k = (x @ t[p + "self_attn.k_proj.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(T, KV_HEADS, HEAD_DIM)
        pos = np.arange(T, dtype=np.float64)
        q, k = self._rope(q, pos), self._rope(k, pos)
        group = HEADS // KV_HEADS
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HEAD_DIM)
        scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(T, -1) @ t[p + "self_attn.o_proj.weight"].T
        residual = hidden + attn
        m = self._norm(residual, t[p + "post_attention_layernorm.weight"])
        gate = m @ t[p + "mlp.gate_proj.weight"].T
        m = (gate / (1 + np.exp(-gate)) * (m @ t[p + "mlp.up_proj.weight"].T)) @ \
            t[p + "mlp.down_proj.weight"].T
        prenorm = residual + m
        return self._norm(prenorm, t["norm.weight"]), prenorm

    def draft(self, normed_row) -> int:
        return int(self.d2t[np.argmax(self.t["lm_head.weight"] @ normed_row)])

    def propose(self, token_ids: list[int], aux: np.ndarray, k: int) -> list[int]:
        """Drafts after a sequence of N tokens whose aux states [N - 1, n_aux * D] are given
        for positions 0..N-2."""
        tokens = list(token_ids[1:])
        hidden = aux @ self.t["fc.weight"].T
        drafts = []
        for _ in range(k):
            normed, prenorm = self.layer(tokens, hidden)
            drafts.append(self.draft(normed[-1]))
            tokens.append(drafts[-1])
            hidden = np.concatenate([hidden, prenorm[-1:]])
        return drafts


def save_tiny_llama_target(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama of hidden size 64 and 128 tokens, head_dim 32 (vLLM's CPU
    attention needs at least that), float32, with the word tokenizer."""
    import transformers

    from tests.helpers import save_tiny_model

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=EPS, tie_word_embeddings=False, rope_theta=THETA, bos_token_id=1,
        eos_token_id=2)
    return save_tiny_model(path, config, seed=seed)
