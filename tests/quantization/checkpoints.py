"""Tiny quantized checkpoints for tests: a random 2-layer Llama (hidden 128, MLP 256, 4 heads
of 32, 2 KV heads, vocabulary 128, untied lm_head) saved by transformers, then quantized

- through compressed_tensors itself (the library llm-compressor saves with): we compute the
  scales (and zero points) from each weight's min / max with its calculate_qparams, its
  ModelCompressor compresses and writes the quantization_config; the reference weights are
  compressed_tensors' own decompression of what it wrote;
- AWQ and GPTQ with our own numpy, packing integers q by the documented layouts (AutoAWQ's
  gemm interleave, AutoGPTQ's input-packed words); the reference weights are (q - z) * s
  from the integers we packed, never from an unpacking.

Each builder returns a QuantizedCheckpoint: the directory (config.json with its
quantization_config, model.safetensors, the word tokenizer), the float64 reference weight of
every quantized module (by prefix, "model.layers.0.self_attn.q_proj."), and the prefixes of
modules left in floating point. Builders take seconds; tests/quantization/conftest.py caches
them per session. `CHECKPOINTS` names the variants the tests use; `save_dequantized` writes
the float checkpoint an end-to-end test compares against.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NUM_LAYERS = 2


@dataclasses.dataclass
class QuantizedCheckpoint:
    path: Path
    reference: dict[str, np.ndarray]  # prefix -> float64 [out, in] dequantized weight
    unquantized: list[str]  # prefixes of linear modules left in floating point
    quantization_config: dict
    base: Path  # the float checkpoint it was quantized from

    def shape(self, prefix: str) -> tuple[int, int]:
        return self.reference[prefix].shape


def linear_prefixes(num_layers: int = NUM_LAYERS) -> list[str]:
    return [f"model.layers.{i}.{p}." for i in range(num_layers) for p in PROJECTIONS]


def save_base_model(path: Path, *, seed: int = 0) -> Path:
    """The float32 tiny Llama every quantized checkpoint starts from."""
    import transformers

    from tests.helpers import save_tiny_model

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=2)
    return save_tiny_model(Path(path), config, seed=seed)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory as numpy (bfloat16 / float8_e4m3fn through
    ml_dtypes), read with the safetensors package (not our reader)."""
    import ml_dtypes
    import torch
    from safetensors import safe_open

    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn)}
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype in special:
                    as_int, np_dtype = special[t.dtype]
                    tensors[name] = t.view(as_int).numpy().view(np_dtype)
                else:
                    tensors[name] = t.numpy()
    return tensors


def _copy_base(base: Path, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in Path(base).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, path / f.name)
    return path


def _write_config(path: Path, quantization_config: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ----- compressed-tensors -----------------------------------------------------------------

def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kw)


def ct_scheme(name: str):
    """(weights, input_activations) QuantizationArgs of a named test scheme."""
    token_int8 = dict(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
    token_fp8 = dict(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    fp8 = dict(num_bits=8, type="float", symmetric=True, dynamic=False)
    schemes = {
        "W8A8": (dict(num_bits=8, type="int", strategy="channel", symmetric=True), token_int8),
        "W8A8_TENSOR": (dict(num_bits=8, type="int", strategy="tensor", symmetric=True),
                        token_int8),
        "FP8_CHANNEL": (dict(fp8, strategy="channel"), token_fp8),
        "FP8_TENSOR": (dict(fp8, strategy="tensor"), token_fp8),
        "FP8_BLOCK": (dict(fp8, strategy="block", block_structure=[128, 128]),
                      dict(token_fp8, strategy="group", group_size=128)),
        "FP8_WEIGHT_ONLY": (dict(fp8, strategy="channel"), None),
        "W4A16": (dict(num_bits=4, type="int", strategy="group", group_size=32), None),
        "W4A16_ASYM": (dict(num_bits=4, type="int", strategy="group", group_size=32,
                            symmetric=False), None),
        "W4A16_CHANNEL": (dict(num_bits=4, type="int", strategy="channel"), None),
        "W8A16": (dict(num_bits=8, type="int", strategy="group", group_size=64), None),
        "W8A16_ASYM": (dict(num_bits=8, type="int", strategy="group", group_size=64,
                            symmetric=False), None),
    }
    weights, inputs = schemes[name]
    return _ct_args(**weights), (None if inputs is None else _ct_args(**inputs))


def _observed_min_max(w, args):
    """Per-scale min and max of weight `w` [out, in] for the strategy of `args` (what an
    observer would record), shaped like the module's weight_scale."""
    import torch

    out, inp = w.shape
    if args.strategy == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if args.strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if args.strategy == "group":
        g = args.group_size
        grouped = w.reshape(out, inp // g, g)
        return grouped.amin(dim=2), grouped.amax(dim=2)
    if args.strategy == "block":
        rows, cols = args.block_structure
        # zeros pad a partial block harmlessly: calculate_qparams widens every range to 0
        padded = torch.nn.functional.pad(w, (0, -inp % cols, 0, -out % rows))
        blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    raise ValueError(args.strategy)


def save_compressed_tensors(path: Path, scheme: str, *, base: Path) -> QuantizedCheckpoint:
    """The base model with every linear of the decoder quantized by the named scheme of
    `ct_scheme` (lm_head ignored), compressed and saved by compressed_tensors."""
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig, QuantizationScheme, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    path = _copy_base(base, path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    weights, inputs = ct_scheme(scheme)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=inputs)}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    modules = {name + ".": m for name, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    with torch.no_grad():
        for m in modules.values():
            args = m.quantization_scheme.weights
            scale, zero_point = calculate_qparams(*_observed_min_max(m.weight, args), args)
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.copy_(zero_point.reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    reference = _ct_reference(compressor, model, modules)
    quant_config = json.loads((path / "config.json").read_text())["quantization_config"]
    return QuantizedCheckpoint(path, reference, ["lm_head."], quant_config, Path(base))


def _ct_reference(compressor, model, modules: dict) -> dict[str, np.ndarray]:
    """compressed_tensors' own dequantization of what it wrote. Its decompression infers a
    block layout from the scale's shape and takes a single column of blocks for per-channel
    scales, so block-quantized modules are dequantized with the scheme's args given."""
    from compressed_tensors.compressors.base import decompress_module
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    reference = {}
    for prefix, m in modules.items():
        args = m.quantization_scheme.weights
        if args.strategy == "block":
            w = dequantize(x_q=m.weight.detach(), scale=m.weight_scale.detach(), args=args,
                           dtype=m.weight_scale.dtype)
        else:
            decompress_module(m)
            w = m.weight.detach()
        reference[prefix] = w.double().numpy()
    compressor.remove_decompression_hook(model)
    return reference


# ----- AWQ and GPTQ (our numpy packing of integers) ----------------------------------------

AWQ_COLUMN_OF_FIELD = (0, 2, 4, 6, 1, 3, 5, 7)  # field j of a word holds column 8c + this


def _float_weights(base: Path) -> dict[str, np.ndarray]:
    return read_tensors(base)


def _asym_quantize(w: np.ndarray, group: int, bits: int, scale_dtype=np.float16):
    """Min/max asymmetric integers of w [out, in] per group: (q [out, in], z [out, G],
    s [out, G] float64 of `scale_dtype`), w ~ (q - z) * s."""
    out, inp = w.shape
    top = (1 << bits) - 1
    grouped = w.reshape(out, inp // group, group).astype(np.float64)
    lo = np.minimum(grouped.min(axis=2), 0.0)
    hi = np.maximum(grouped.max(axis=2), 0.0)
    s = ((hi - lo) / top).astype(scale_dtype).astype(np.float64)
    s = np.where(s == 0, 1.0, s)
    z = np.clip(np.rint(-lo / s), 1, top)  # z >= 1: the old GPTQ format cannot store 0
    q = np.clip(np.rint(grouped / s[..., None]) + z[..., None], 0, top)
    return q.reshape(out, inp).astype(np.int64), z.astype(np.int64), s


def _sym_quantize(w: np.ndarray, group: int, bits: int, scale_dtype=np.float16):
    """GPTQ's symmetric integers: zero point 2^(bits-1), s = 2 max|w| / (2^bits - 1)."""
    out, inp = w.shape
    top = (1 << bits) - 1
    grouped = w.reshape(out, inp // group, group).astype(np.float64)
    s = (2 * np.abs(grouped).max(axis=2) / top).astype(scale_dtype).astype(np.float64)
    s = np.where(s == 0, 1.0, s)
    z = np.full(s.shape, 1 << (bits - 1), np.int64)
    q = np.clip(np.rint(grouped / s[..., None]) + z[..., None], 0, top)
    return q.reshape(out, inp).astype(np.int64), z, s


def _dequantize(q, z, s, group: int) -> np.ndarray:
    rep = lambda a: np.repeat(a, group, axis=1)  # noqa: E731
    return (q - rep(z)).astype(np.float64) * rep(s)


def _words(fields: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] unsigned fields -> int32 words, field j at bits j*bits (least first)."""
    word = np.zeros(fields.shape[:-1], np.uint64)
    for j in range(fields.shape[-1]):
        word |= (fields[..., j].astype(np.uint64) & ((1 << bits) - 1)) << np.uint64(bits * j)
    return word.astype(np.uint32).view(np.int32)


def awq_pack(values_by_column: np.ndarray) -> np.ndarray:
    """AWQ gemm packing of 4-bit [rows, cols] integers along the columns: word c of a row
    has column 8c + AWQ_COLUMN_OF_FIELD[j] in field j."""
    rows, cols = values_by_column.shape
    by_word = values_by_column.reshape(rows, cols // 8, 8)
    return _words(by_word[:, :, list(AWQ_COLUMN_OF_FIELD)], 4)


def save_awq(path: Path, *, base: Path, group_size: int = 32,
             num_layers: int = NUM_LAYERS, with_reference: bool = True) -> QuantizedCheckpoint:
    """AutoAWQ gemm layout: qweight [in, out/8], qzeros [in/g, out/8], scales f16 [in/g, out].
    Every decoder projection of `num_layers` layers, round-to-nearest min/max per group (no
    activation-aware calibration); benchmarks/_server.py uses it on SmolLM2 too
    (with_reference=False: no float64 copies)."""
    from safetensors.numpy import save_file

    path = _copy_base(base, path)
    tensors = _float_weights(base)
    reference = {}
    for prefix in linear_prefixes(num_layers):
        w = tensors.pop(prefix + "weight")
        group = w.shape[1] if group_size == -1 else group_size
        q, z, s = _asym_quantize(w, group, 4)
        if with_reference:
            reference[prefix] = _dequantize(q, z, s, group)
        tensors[prefix + "qweight"] = awq_pack(q.T)  # [in, out] packed along out
        tensors[prefix + "qzeros"] = awq_pack(z.T)
        tensors[prefix + "scales"] = np.ascontiguousarray(s.T.astype(np.float16))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    quant_config = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                    "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    _write_config(path, quant_config)
    return QuantizedCheckpoint(path, reference, ["lm_head."], quant_config, Path(base))


def gptq_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ qweight packing of [rows, cols] integers along the rows: word r of a column
    has row n*r + i in field i (n = 32 / bits)."""
    rows, cols = values.shape
    n = 32 // bits
    return _words(values.reshape(rows // n, n, cols).transpose(0, 2, 1), bits)


def gptq_pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ qzeros packing of [rows, cols] integers along the columns."""
    rows, cols = values.shape
    n = 32 // bits
    return _words(values.reshape(rows, cols // n, n), bits)


def save_gptq(path: Path, *, base: Path, bits: int = 4, group_size: int = 32,
              sym: bool = True, checkpoint_format: str = "gptq", desc_act: bool = False,
              g_idx: bool = True) -> QuantizedCheckpoint:
    """AutoGPTQ / GPTQModel layout: qweight [in/n, out], qzeros [in/g, out/n] (z - 1 in
    the "gptq" format, z in "gptq_v2"), scales f16 [in/g, out], g_idx [in] = k // g."""
    from safetensors.numpy import save_file

    path = _copy_base(base, path)
    tensors = _float_weights(base)
    reference = {}
    for prefix in linear_prefixes():
        w = tensors.pop(prefix + "weight")
        inp = w.shape[1]
        group = inp if group_size == -1 else group_size
        q, z, s = (_sym_quantize if sym else _asym_quantize)(w, group, bits)
        reference[prefix] = _dequantize(q, z, s, group)
        stored_z = z - 1 if checkpoint_format == "gptq" else z
        tensors[prefix + "qweight"] = gptq_pack_rows(q.T, bits)  # [in, out] packed along in
        tensors[prefix + "qzeros"] = gptq_pack_columns(stored_z.T, bits)
        tensors[prefix + "scales"] = np.ascontiguousarray(s.T.astype(np.float16))
        if g_idx:
            tensors[prefix + "g_idx"] = (np.arange(inp) // group).astype(np.int32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    quant_config = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                    "desc_act": desc_act, "sym": sym, "lm_head": False,
                    "checkpoint_format": checkpoint_format, "true_sequential": True,
                    "static_groups": False, "damp_percent": 0.01}
    _write_config(path, quant_config)
    return QuantizedCheckpoint(path, reference, ["lm_head."], quant_config, Path(base))


def save_dequantized(checkpoint: QuantizedCheckpoint, path: Path) -> Path:
    """The base model with each quantized module's weight replaced by its reference
    dequantization (float32), no quantization_config: what transformers (or our engine,
    unquantized) should compute like the quantized checkpoint does, for end-to-end tests."""
    from safetensors.numpy import save_file

    path = _copy_base(checkpoint.base, path)
    tensors = read_tensors(checkpoint.base)
    for prefix, weight in checkpoint.reference.items():
        tensors[prefix + "weight"] = weight.astype(np.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def int8_token_inputs(model, prefixes):
    """Forward pre-hooks on a transformers model's modules at `prefixes` that round each
    input row to int8 dynamically, symmetrically (scale max|x| / 127, round to nearest even,
    clamp to [-128, 127]: vLLM's scaled_int8_quant), as W8A8 int8 serving does; with the
    dequantized checkpoint, transformers then computes what W8A8 int8 should. Returns the
    hook handles (call .remove() on each to undo)."""
    import torch

    def quantize_rows(module, args):
        x = args[0]
        scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(x.float() / safe), -128, 127)
        return ((q * safe).to(x.dtype), *args[1:])

    modules = dict(model.named_modules())
    return [modules[p[:-1]].register_forward_pre_hook(quantize_rows) for p in prefixes]


def save_kv_cache_scales(path: Path, *, base: Path, k_scales, v_scales) -> Path:
    """The float base model with compressed-tensors' FP8 KV cache scheme (what llm-compressor
    writes for a calibrated FP8 KV cache): no quantized weights (empty config_groups), a
    kv_cache_scheme, and float32 `model.layers.{i}.self_attn.k_scale` / `v_scale` of shape
    [1] per layer."""
    import torch
    from safetensors.torch import save_file

    path = _copy_base(base, path)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array))
               for name, array in read_tensors(base).items()}
    for i, (k, v) in enumerate(zip(k_scales, v_scales)):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([k], dtype=torch.float32)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v], dtype=torch.float32)
    save_file(tensors, str(path / "model.safetensors"))
    _write_config(path, {
        "quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
        "quantization_status": "compressed", "ignore": [],
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                            "symmetric": True, "dynamic": False}})
    return path


# Per-layer FP8 KV cache scales of the test checkpoints: not powers of two, so that dividing
# by them changes how values round.
K_SCALES, V_SCALES = (0.0037, 0.021), (0.0113, 0.0029)


def save_base_and_kv_scaled(root: Path) -> tuple[Path, Path]:
    """(the float base model, the same weights with K_SCALES / V_SCALES declared)."""
    base = save_base_model(Path(root) / "base")
    return base, save_kv_cache_scales(Path(root) / "scaled", base=base, k_scales=K_SCALES,
                                      v_scales=V_SCALES)


def fp8_kv_cache_attention(k_scales, v_scales) -> str:
    """Registers, with transformers' AttentionInterface, eager attention whose keys (after
    rotary embedding) and values are rounded as an fp8 (e4m3) cache with these per-layer
    scales stores them: x / scale saturated to +-448, to float8_e4m3fn, times the scale.
    Returns the implementation's name for from_pretrained(attn_implementation=...)."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def rounded(x, scale):
        return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype) * scale

    def attention(module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        return eager_attention_forward(module, query, rounded(key, k_scales[i]),
                                       rounded(value, v_scales[i]), attention_mask, **kwargs)

    name = "fp8_kv_" + "_".join(f"{s:g}" for s in (*k_scales, *v_scales))
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # else the causal mask is dropped
    return name


# name -> (builder, keyword arguments); the session fixture builds each on first use.
CHECKPOINTS = {
    **{f"ct-{s.lower().replace('_', '-')}": (save_compressed_tensors, {"scheme": s})
       for s in ("W8A8", "W8A8_TENSOR", "FP8_CHANNEL", "FP8_TENSOR", "FP8_BLOCK",
                 "FP8_WEIGHT_ONLY", "W4A16", "W4A16_ASYM", "W4A16_CHANNEL", "W8A16",
                 "W8A16_ASYM")},
    "awq-g32": (save_awq, {"group_size": 32}),
    "awq-g128": (save_awq, {"group_size": 128}),
    "gptq-4bit-sym": (save_gptq, {"bits": 4}),
    "gptq-4bit-asym": (save_gptq, {"bits": 4, "sym": False}),
    "gptq-4bit-asym-v2": (save_gptq, {"bits": 4, "sym": False, "checkpoint_format": "gptq_v2"}),
    "gptq-4bit-channel": (save_gptq, {"bits": 4, "group_size": -1}),
    "gptq-4bit-desc-act": (save_gptq, {"bits": 4, "desc_act": True}),
    "gptq-8bit-sym": (save_gptq, {"bits": 8, "group_size": 64}),
    "gptq-8bit-asym": (save_gptq, {"bits": 8, "sym": False, "group_size": 64}),
}


def build(name: str, path: Path, base: Path) -> QuantizedCheckpoint:
    builder, kwargs = CHECKPOINTS[name]
    return builder(Path(path), base=Path(base), **kwargs)
