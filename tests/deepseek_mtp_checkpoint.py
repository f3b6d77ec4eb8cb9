"""A tiny random DeepSeek-V3 whose checkpoint keeps one MTP layer as DeepSeek's do
(`model.layers.3.*`: enorm, hnorm, eh_proj, a decoder block, shared_head.norm/head and a
copy of embed_tokens; transformers creates none of them, so they are written here), and a
reference of that layer assembled from transformers' DeepSeek-V3 modules in float64."""

from pathlib import Path

import numpy as np

from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

NUM_LAYERS = 3  # the target's; the MTP layer is model.layers.3
HIDDEN, VOCAB = 64, 128


def _scale_residual_writes(tensors: dict, factor: float, layer: int) -> None:
    """Shrink what a layer adds to the residual stream (attention out, MLP down)."""
    for name in tensors:
        if name.startswith(f"model.layers.{layer}.") and \
                name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = (tensors[name] * factor).astype(np.float32)


def save_tiny_deepseek_mtp(path: Path, *, seed: int = 0, echo: bool = False) -> Path:
    """The 3-layer tiny DeepSeek-V3 of tests/models/test_deepseek_v3.py with
    num_nextn_predict_layers 1 and an MTP layer (its block random, an MoE block as layer 3
    of that model would be).

    echo: a target whose layers add little to the residual stream (it mostly predicts the
    next token from the current one), and an MTP layer whose eh_proj passes the next token's
    embedding through, whose block adds little, and whose shared_head.norm is the target's
    final norm: the layer then predicts what the target will predict one position later, so
    most drafts are accepted."""
    from safetensors.numpy import load_file, save_file

    save_tiny_deepseek_v3(path, seed=seed, num_nextn_predict_layers=1)
    donor = save_tiny_deepseek_v3(path.parent / (path.name + "-4-layers"), seed=seed + 1,
                                  num_hidden_layers=NUM_LAYERS + 1)
    tensors = load_file(path / "model.safetensors")
    prefix = f"model.layers.{NUM_LAYERS}."
    tensors.update({k: v for k, v in load_file(donor / "model.safetensors").items()
                    if k.startswith(prefix)})
    rng = np.random.default_rng(seed + 2)
    D = HIDDEN
    tensors[prefix + "enorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tensors[prefix + "hnorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tensors[prefix + "eh_proj.weight"] = (rng.standard_normal((D, 2 * D)) /
                                          np.sqrt(2 * D)).astype(np.float32)
    tensors[prefix + "shared_head.norm.weight"] = \
        (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].copy()
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    if echo:
        for layer in range(NUM_LAYERS + 1):
            _scale_residual_writes(tensors, 0.02, layer)
        eh = np.zeros((D, 2 * D), np.float32)
        eh[:, :D] = np.eye(D)
        tensors[prefix + "eh_proj.weight"] = eh
        tensors[prefix + "enorm.weight"] = np.ones(D, np.float32)
        tensors[prefix + "shared_head.norm.weight"] = tensors["model.norm.weight"].copy()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


class TransformersMtp:
    """The MTP layer in float64: enorm, hnorm and eh_proj in numpy, the block and
    shared_head.norm as a one-layer transformers DeepseekV3Model (its final norm loaded
    with shared_head.norm), fed eh_proj's output as input embeddings; the target's
    embedding and LM head."""

    def __init__(self, path: Path):
        import torch
        import transformers
        from safetensors.numpy import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        prefix = f"model.layers.{NUM_LAYERS}."
        own = ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens")
        block = {k.replace(prefix, "model.layers.0."): v for k, v in tensors.items()
                 if k.startswith(prefix) and not k[len(prefix):].startswith(own)}
        block["model.norm.weight"] = tensors[prefix + "shared_head.norm.weight"]
        block["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        block["lm_head.weight"] = tensors["lm_head.weight"]
        # A one-layer checkpoint of the block, loaded by transformers' own loader (it fuses
        # the experts).
        config = transformers.DeepseekV3Config.from_pretrained(path)
        dense = NUM_LAYERS < config.first_k_dense_replace
        config.num_hidden_layers, config.first_k_dense_replace = 1, int(dense)
        one_layer = path.parent / (path.name + "-mtp-block")
        config.save_pretrained(one_layer)
        save_file(block, one_layer / "model.safetensors", metadata={"format": "pt"})
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(
            one_layer, dtype=torch.float64, attn_implementation="eager",
            experts_implementation="eager").eval()
        self.model = model.model
        self.t = {k: v.astype(np.float64) for k, v in tensors.items() if k.startswith(prefix)}
        self.prefix, self.eps = prefix, config.rms_norm_eps
        self.embed = tensors["model.embed_tokens.weight"].astype(np.float64)
        self.lm_head = tensors["lm_head.weight"].astype(np.float64)

    def _norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def forward(self, tokens: list[int], hidden: np.ndarray) -> np.ndarray:
        """tokens [T] (the token after each position), hidden [T, D] (the target's, or
        fed back) -> y [T, D] at positions 0..T-1."""
        import torch

        t, p = self.t, self.prefix
        e = self.embed[np.asarray(tokens)].copy()
        e[0] = 0.0  # vLLM masks the embedding at position 0
        x = np.concatenate([self._norm(e, t[p + "enorm.weight"]),
                            self._norm(hidden, t[p + "hnorm.weight"])], -1) @ t[p + "eh_proj.weight"].T
        with torch.no_grad():
            out = self.model(inputs_embeds=torch.from_numpy(x)[None]).last_hidden_state[0]
        return out.numpy()

    def logits(self, tokens: list[int], hidden: np.ndarray) -> np.ndarray:
        return self.forward(tokens, hidden) @ self.lm_head.T

    def propose(self, token_ids: list[int], target_hidden: np.ndarray, k: int) -> list[int]:
        """Drafts after N tokens, the target's final hidden states [N - 1, D] given; the
        layer's output y fed back as the next position's hidden state."""
        tokens, hidden, drafts = list(token_ids[1:]), target_hidden, []
        for _ in range(k):
            y = self.forward(tokens, hidden)
            drafts.append(int(np.argmax(self.lm_head @ y[-1])))
            tokens.append(drafts[-1])
            hidden = np.concatenate([hidden, y[-1:]])
        return drafts


FP8_BLOCK = 16  # divides every input size of the tiny model (DeepSeek's own: 128)


def save_fp8_block_copies(source: Path, fp8: Path, dequantized: Path) -> tuple[Path, Path]:
    """DeepSeek's FP8 export of `source` (quant_method fp8, weight_block_size
    FP8_BLOCK x FP8_BLOCK): every decoder projection and expert, the MTP layer's block
    included, as float8_e4m3fn with a float32 `weight_scale_inv` per block (amax / 448);
    the embedding, LM head, norms, routers and the MTP layer's eh_proj (vLLM's plain
    nn.Linear) stay float. `dequantized`: the float32 model of exactly the FP8 values times
    their scales (the reference)."""
    import json
    import shutil

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    tensors = load_file(source / "model.safetensors")
    quantized, floats = {}, {}
    for name, w in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")
                and w.ndim == 2 and not name.endswith("eh_proj.weight")):
            quantized[name] = floats[name] = w
            continue
        out, inp = w.shape
        rows = -(-out // FP8_BLOCK) * FP8_BLOCK
        padded = np.zeros((rows, inp), np.float32)
        padded[:out] = w
        blocks = padded.reshape(rows // FP8_BLOCK, FP8_BLOCK, inp // FP8_BLOCK, FP8_BLOCK)
        scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
        full = np.repeat(np.repeat(scale, FP8_BLOCK, 0), FP8_BLOCK, 1)[:out]
        values = (w / full).astype(ml_dtypes.float8_e4m3fn)
        quantized[name] = values
        quantized[name + "_scale_inv"] = scale.astype(np.float32)
        floats[name] = (values.astype(np.float32) * full).astype(np.float32)
    for path, weights in ((fp8, quantized), (dequantized, floats)):
        shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, dequantized
