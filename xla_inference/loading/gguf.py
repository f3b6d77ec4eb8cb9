"""GGUF reading: metadata, float32 dequantization, and Llama -> Hugging Face mapping.

The `gguf` package parses the container (header, key/values, tensor infos, byte offsets);
everything after the raw bytes is ours. Dequantization follows ggml's reference
arithmetic in float32 so results match `gguf.quants.dequantize` bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

GGMLType = gguf.GGMLQuantizationType

# Element count and byte count of one block, per ggml's block_q* structs. The K-quants
# pack 256 elements into a super-block of 8 (Q4_K) or 16 (Q6_K) scaled sub-blocks.
_QK = 32
_QK_K = 256
_BLOCK_SHAPE = {
    GGMLType.Q8_0: (_QK, 2 + 32),
    GGMLType.Q4_0: (_QK, 2 + 16),
    GGMLType.Q4_1: (_QK, 2 + 2 + 16),
    GGMLType.Q5_0: (_QK, 2 + 4 + 16),
    GGMLType.Q4_K: (_QK_K, 2 + 2 + 12 + 128),
    GGMLType.Q6_K: (_QK_K, 128 + 64 + 16 + 2),
}


# --------------------------------------------------------------------------- dequantization


def _f16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """Per-block f16 scale stored at byte `start`, widened to float32: [num_blocks, 1]."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """[num_blocks, 16] bytes -> [num_blocks, 32] values 0..15.

    ggml stores element i in the low nibble of byte i and element i + 16 in the high
    nibble, so the low nibbles form the first half of the block.
    """
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    scale = _f16_column(blocks, 0)
    quants = blocks[:, 2:].view(np.int8).astype(np.float32)
    return quants * scale


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    scale = _f16_column(blocks, 0)
    quants = _unpack_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return quants.astype(np.float32) * scale


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    scale = _f16_column(blocks, 0)
    minimum = _f16_column(blocks, 2)
    quants = _unpack_nibbles(blocks[:, 4:]).astype(np.float32)
    # Two float32 roundings (multiply, then add), not a fused multiply-add, as ggml's
    # scalar reference and gguf-py do.
    return quants * scale + minimum


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    scale = _f16_column(blocks, 0)
    # Bit i of the little-endian 32-bit word at bytes 2..5 is the fifth bit of element i.
    high_bits = blocks[:, 2:6].view("<u4") >> np.arange(32, dtype=np.uint32)
    fifth_bit = (high_bits & np.uint32(1)).astype(np.uint8) << np.uint8(4)
    quants = (_unpack_nibbles(blocks[:, 6:]) | fifth_bit).astype(np.int8) - np.int8(16)
    return quants.astype(np.float32) * scale


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes per super-block -> eight 6-bit scales and eight 6-bit mins [n, 8].

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins
    4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from the top 2 bits
    of bytes 0-3 (scales) and 4-7 (mins).
    """
    low_scales, low_mins, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    top2 = lambda b: (b >> np.uint8(6)) << np.uint8(4)  # noqa: E731
    scales = np.concatenate([low_scales & np.uint8(63), (extra & np.uint8(15)) | top2(low_scales)], axis=1)
    mins = np.concatenate([low_mins & np.uint8(63), (extra >> np.uint8(4)) | top2(low_mins)], axis=1)
    return scales, mins


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    num_blocks = blocks.shape[0]
    scales, mins = _q4_k_scales_and_mins(blocks[:, 4:16])
    # One float32 rounding per factor, then one each for the product and the difference.
    step = (_f16_column(blocks, 0) * scales.astype(np.float32))[:, :, None]  # [n, 8, 1]
    offset = (_f16_column(blocks, 2) * mins.astype(np.float32))[:, :, None]
    # Each 32-byte group holds sub-block 2j in its low nibbles and 2j+1 in its high ones.
    packed = blocks[:, 16:].reshape(num_blocks, 4, 1, 32)
    quants = (packed >> np.array([0, 4], np.uint8)[:, None]) & np.uint8(15)
    quants = quants.reshape(num_blocks, 8, 32).astype(np.float32)
    return (step * quants - offset).reshape(num_blocks, _QK_K)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    num_blocks = blocks.shape[0]
    low, high = blocks[:, :128], blocks[:, 128:192]
    sub_scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # one per 16 elements
    step = (_f16_column(blocks, 208) * sub_scales)[:, :, None]  # [n, 16, 1]
    # Per 128-element half: elements 32j..32j+31 take nibble j // 2 (low, high) of low
    # bytes 32 * (j % 2) onward, and bit pair j of the half's 32 high bytes.
    low4 = (low.reshape(num_blocks, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & np.uint8(15)
    high2 = (high.reshape(num_blocks, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)
    quants = low4.reshape(num_blocks, 8, 32) | (high2.reshape(num_blocks, 8, 32) << np.uint8(4))
    quants = (quants.astype(np.int8) - np.int8(32)).astype(np.float32)
    return (step * quants.reshape(num_blocks, 16, 16)).reshape(num_blocks, _QK_K)


def _dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32: shifting the bits back up is exact.
    return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


_BLOCK_DEQUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q8_0: _dequantize_q8_0,
    GGMLType.Q4_0: _dequantize_q4_0,
    GGMLType.Q4_1: _dequantize_q4_1,
    GGMLType.Q5_0: _dequantize_q5_0,
    GGMLType.Q4_K: _dequantize_q4_k,
    GGMLType.Q6_K: _dequantize_q6_k,
}

_ELEMENT_DEQUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: lambda raw: raw.view(np.float32).copy(),
    GGMLType.F16: lambda raw: raw.view(np.float16).astype(np.float32),
    GGMLType.BF16: _dequantize_bf16,
}

SUPPORTED_TYPES = frozenset(_BLOCK_DEQUANTIZERS) | frozenset(_ELEMENT_DEQUANTIZERS)


def dequantize(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...], name: str = "") -> np.ndarray:
    """Raw little-endian tensor bytes -> float32 array of numpy `shape` (ggml dims reversed)."""
    ggml_type = GGMLType(ggml_type)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    num_elements = int(np.prod(shape, dtype=np.int64))
    if ggml_type in _ELEMENT_DEQUANTIZERS:
        flat = _ELEMENT_DEQUANTIZERS[ggml_type](raw)
    elif ggml_type in _BLOCK_DEQUANTIZERS:
        block_elements, block_bytes = _BLOCK_SHAPE[ggml_type]
        if shape and shape[-1] % block_elements:
            raise ValueError(f"GGUF tensor {name!r}: rows of {shape[-1]} are not whole {ggml_type.name} blocks")
        blocks = raw.reshape(-1, block_bytes)
        flat = _BLOCK_DEQUANTIZERS[ggml_type](blocks).reshape(-1)
    else:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(
            f"GGUF tensor {name!r} has type {ggml_type.name}, which xla_inference cannot "
            f"dequantize (supported: {supported})"
        )
    if flat.size != num_elements:
        raise ValueError(f"GGUF tensor {name!r}: {flat.size} values decoded, shape {shape} needs {num_elements}")
    return flat.reshape(shape)


# --------------------------------------------------------------------------- reading


def _plain_value(value: Any, value_type: gguf.GGUFValueType) -> Any:
    # GGUF stores float32; its shortest decimal (1e-05, not 9.999999747378752e-06) keeps
    # config.json readable and still round-trips to the same float32.
    if value_type == gguf.GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))
    return value


def _field_value(field: gguf.ReaderField) -> Any:
    value = field.contents()
    if not field.types:
        return value
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [_plain_value(v, field.types[-1]) for v in value]
    return _plain_value(value, field.types[0])


def _tensor_bytes(reader: gguf.GGUFReader, tensor: gguf.ReaderTensor) -> np.ndarray:
    return reader.data[tensor.data_offset : tensor.data_offset + tensor.n_bytes]


def numpy_shape(ggml_dims: Iterable[int]) -> tuple[int, ...]:
    """ggml lists dims fastest-varying first (ne0 = row length); numpy wants it last."""
    return tuple(int(d) for d in reversed(list(ggml_dims)))


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Returns (metadata as plain python values, tensors dequantized to float32)."""
    reader = gguf.GGUFReader(path)
    if reader.byte_order != "I":
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    tensors = {
        t.name: dequantize(_tensor_bytes(reader, t), t.tensor_type, numpy_shape(t.shape), t.name)
        for t in reader.tensors
    }
    return metadata, tensors


# --------------------------------------------------------------------------- Llama -> HF


def arch_key(metadata: dict[str, Any], suffix: str, default: Any = None) -> Any:
    key = f"{metadata['general.architecture']}.{suffix}"
    if key not in metadata and default is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return metadata.get(key, default)


def _check_llama(metadata: dict[str, Any]) -> None:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a GGUF of architecture 'llama', got {arch!r}")
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")


_TOKEN_ID_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def common_hf_config(metadata: dict[str, Any], tensor_names: Iterable[str] | None) -> dict[str, Any]:
    """The config.json entries every architecture reads the same way: lengths, vocabulary,
    tied embeddings (iff there is no `output.weight`; assumed without tensor names), dtype
    and the special token ids."""
    vocab_size = arch_key(metadata, "vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])))
    config = {
        "max_position_embeddings": int(arch_key(metadata, "context_length")),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": tensor_names is None or "output.weight" not in set(tensor_names),
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    for hf_key, gguf_key in _TOKEN_ID_KEYS.items():
        if gguf_key in metadata:
            config[hf_key] = int(metadata[gguf_key])
    return config


def llama_hf_config_from_gguf(
    metadata: dict[str, Any], tensor_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """A Hugging Face LlamaConfig dict (config.json) for a llama GGUF.

    `tensor_names` decides tie_word_embeddings (tied iff there is no `output.weight`);
    without it the embeddings are assumed tied and the state-dict mapping will refuse
    a file that has its own `output.weight`.
    """
    _check_llama(metadata)
    hidden_size = int(arch_key(metadata, "embedding_length"))
    num_heads = int(arch_key(metadata, "attention.head_count"))
    head_dim = int(arch_key(metadata, "attention.key_length", hidden_size // num_heads))
    rope_theta = float(arch_key(metadata, "rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(arch_key(metadata, "feed_forward_length")),
        "num_hidden_layers": int(arch_key(metadata, "block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(arch_key(metadata, "attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(arch_key(metadata, "attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        # transformers >= 5 reads rope settings from here; older readers use rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        **common_hf_config(metadata, tensor_names),
    }


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF layer tensor kind -> HF module under model.layers.N (Llama's; others extend it).
LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str, layer_names: dict[str, str] = LLAMA_LAYER_NAMES, family: str = "Llama") -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face {family} counterpart")


def rope_rows_to_hf(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    HF's rotary embedding pairs dimension j with j + head_dim/2 of each head ("rotate
    half"); llama.cpp pairs neighbours 2j, 2j+1, so its converter moved HF row j of a
    head to row 2j and row j + head_dim/2 to row 2j+1. Gathering even rows then odd rows
    per head puts them back.
    """
    head_dim = weight.shape[0] // num_heads
    within_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    rows = (np.arange(num_heads)[:, None] * head_dim + within_head[None, :]).reshape(-1)
    return weight[rows]


def llama_hf_state_dict_from_gguf(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """GGUF tensors (numpy order) -> HF LlamaForCausalLM parameter names and layouts."""
    if config["tie_word_embeddings"] and "output.weight" in tensors:
        raise ValueError("config ties word embeddings but the GGUF has its own output.weight")
    if not config["tie_word_embeddings"] and "output.weight" not in tensors:
        raise ValueError("config unties word embeddings but the GGUF has no output.weight")
    heads_of = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for name, weight in tensors.items():
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if kind in heads_of:
            weight = rope_rows_to_hf(weight, heads_of[kind])
        state[hf_name(name)] = np.ascontiguousarray(weight, dtype=np.float32)
    return state
