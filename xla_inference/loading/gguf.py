"""GGUF reading: metadata, lazy float32 tensors, and Llama -> Hugging Face mapping.

The `gguf` package parses the container (header, key/values, tensor infos, byte offsets)
over a memory map and dequantizes (`gguf.quants.dequantize`, the same function
transformers' GGUF loader calls). A tensor is dequantized only when it is asked for, so a
large GGUF never sits whole in float32 in host memory; its shape and raw quantized blocks
are available without dequantizing, and so is, for the block types that have one, its
GroupQuant (`HFTensors.quantized_weight`, quantization/formats/gguf_blocks.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np

from xla_inference.loading.safetensors import CHECKPOINT_READS
from xla_inference.quantization.formats.gguf_blocks import SUPPORTED_TYPES, group_quant_from_blocks
from xla_inference.quantization.formats.slicing import cut
from xla_inference.quantization.groups import GroupQuant
from xla_inference.quantization.sliced import QuantSlices, rows_as_slice_or_array

GGMLType = gguf.GGMLQuantizationType


# --------------------------------------------------------------------------- raw tensors


@dataclasses.dataclass(frozen=True)
class RawTensor:
    """One tensor as the file stores it.

    `data` is a read-only view of the memory map: for the block types (Q4_K, Q8_0, ...)
    uint8 of shape [..., bytes per row], whole blocks per row as `gguf.quants` expects;
    for F32/F16 the elements themselves. `shape` is the numpy shape of the values
    (ggml's dims reversed).
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray

    def take_rows(self, rows: np.ndarray) -> RawTensor:
        """The tensor with its outermost rows gathered; exact for block types too, since
        ggml blocks never span rows."""
        return dataclasses.replace(self, shape=(len(rows), *self.shape[1:]), data=self.data[rows])


def dequantize(raw: RawTensor) -> np.ndarray:
    """A tensor's values as a float32 array of its numpy shape, owned (not a view of the file)."""
    try:
        values = gguf.quants.dequantize(raw.data, raw.ggml_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {raw.name!r} has type {raw.ggml_type.name}, which the gguf "
                         f"package cannot dequantize to float32") from e
    if np.may_share_memory(values, raw.data):  # F32 comes back as a view of the file
        values = np.array(values)
    if values.shape != raw.shape:
        raise ValueError(f"GGUF tensor {raw.name!r}: dequantized to {values.shape}, expected {raw.shape}")
    return values


def numpy_shape(ggml_dims: Iterable[int]) -> tuple[int, ...]:
    """ggml lists dims fastest-varying first (ne0 = row length); numpy wants it last."""
    return tuple(int(d) for d in reversed(list(ggml_dims)))


class GGUFTensors(Mapping):
    """GGUF name -> float32 array, dequantized from the memory-mapped file on each access.

    Membership, iteration, `shape` and `raw` read only the tensor infos, never the data.
    Each access dequantizes again: consumers take each tensor once.
    """

    def __init__(self, reader: gguf.GGUFReader):
        self._tensors = {t.name: t for t in reader.tensors}

    def raw(self, name: str) -> RawTensor:
        t = self._tensors[name]
        return RawTensor(t.name, GGMLType(t.tensor_type), numpy_shape(t.shape), t.data)

    def shape(self, name: str) -> tuple[int, ...]:
        return numpy_shape(self._tensors[name].shape)

    def __getitem__(self, name: str) -> np.ndarray:
        return dequantize(self.raw(name))

    def __contains__(self, name: object) -> bool:  # Mapping's default would dequantize
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def tensor_shape(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """`tensors[name]`'s shape, without dequantizing it when `tensors` is lazy."""
    if isinstance(tensors, (GGUFTensors, HFTensors)):
        return tensors.shape(name)
    return tuple(np.shape(tensors[name]))


# --------------------------------------------------------------------------- GGUF -> HF names


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one HF tensor comes from one GGUF tensor: its outer rows gathered (`rows`, a
    permutation), then, after dequantizing, `subtract` taken off every value in float32."""

    gguf_name: str
    rows: np.ndarray | None = None
    subtract: float = 0.0


class HFTensors(Mapping):
    """HF name -> float32 array, made on access from a GGUF tensor by its `Recipe`.

    `source` is a `GGUFTensors` (lazy) or any mapping of GGUF names to float32 arrays.
    `raw` gives the quantized blocks with the row permutation applied, for serving the
    blocks without dequantizing.
    """

    # A multi-host process (loading/checkpoint.load_checkpoint's reads_slices): quantized
    # weights come back unread, read block by block where placement asks (sliced_blocks).
    # (Not `reads_slices`: the other tensors are dequantized whole on access, so a plain
    # tensor's slices would come from memory, not the file.)
    reads_blocks = False

    def __init__(self, source: Mapping[str, np.ndarray], recipes: dict[str, Recipe]):
        self._source = source
        self._recipes = recipes

    def recipe(self, name: str) -> Recipe:
        return self._recipes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self._source, self._recipes[name].gguf_name)  # recipes keep shapes

    def raw(self, name: str) -> RawTensor:
        """The tensor's stored blocks, rows in HF order. Tensors whose values change
        (`subtract`) have no raw form: dequantize them with `[name]`."""
        recipe = self._recipes[name]
        if not isinstance(self._source, GGUFTensors):
            raise ValueError(f"{name!r}: raw blocks exist only for tensors read from a GGUF file")
        if recipe.subtract:
            raise ValueError(f"{name!r} is {recipe.gguf_name!r} minus {recipe.subtract}; "
                             f"it has no raw form, dequantize it instead")
        raw = self._source.raw(recipe.gguf_name)
        return raw if recipe.rows is None else raw.take_rows(recipe.rows)

    def quantized_weight(self, name: str) -> GroupQuant | None:
        """The tensor kept quantized, rows in HF order, exactly equal to `self[name]` once
        dequantized; None where there is no such form: float tensors (F32/F16/BF16), block
        types without a GroupQuant form, tensors other than 2-D, recipes that change
        values (`subtract`), and sources that are not a GGUF file."""
        recipe = self._recipes[name]
        if not isinstance(self._source, GGUFTensors) or recipe.subtract:
            return None
        raw = self._source.raw(recipe.gguf_name)
        if raw.ggml_type not in SUPPORTED_TYPES or len(raw.shape) != 2:
            return None
        if self.reads_blocks:
            return sliced_blocks(raw, recipe.rows, name)
        # Rows are gathered as blocks (whole rows, so exact) before they are unpacked.
        raw = raw if recipe.rows is None else raw.take_rows(recipe.rows)
        return group_quant_from_blocks(raw.ggml_type, raw.data, raw.shape, name)

    def __getitem__(self, name: str) -> np.ndarray:
        recipe = self._recipes[name]
        if isinstance(self._source, GGUFTensors):
            raw = self._source.raw(recipe.gguf_name)
            # Gathering the blocks before dequantizing moves bytes, not float32 values.
            values = dequantize(raw if recipe.rows is None else raw.take_rows(recipe.rows))
        else:
            values = np.asarray(self._source[recipe.gguf_name], dtype=np.float32)
            values = values if recipe.rows is None else values[recipe.rows]
        if recipe.subtract:
            values = values - np.float32(recipe.subtract)
        return np.ascontiguousarray(values)

    def __contains__(self, name: object) -> bool:
        return name in self._recipes

    def __iter__(self) -> Iterator[str]:
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)


def sliced_blocks(raw: RawTensor, rows: np.ndarray | None, name: str) -> QuantSlices:
    """A 2-D block-quantized tensor as a QuantSlices: a block of rows and columns reads
    from the file just those rows' bytes of the ggml blocks that hold those columns (a
    ggml block never spans rows; a block of columns not made of whole ggml blocks reads
    the rows whole and cuts them). `rows`: HF row i is stored row rows[i] (rope order)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[raw.ggml_type]
    out, inp = raw.shape

    def read_block(stored_rows, c0: int, c1: int, part) -> GroupQuant:
        # The bytes hold values and scales together: either part reads both (QuantSlices
        # keeps the block for the other).
        stored_rows = rows_as_slice_or_array(stored_rows)
        aligned = c0 % block_size == 0 and c1 % block_size == 0
        b0, b1 = (c0, c1) if aligned else (0, inp)
        data = np.array(raw.data[stored_rows, b0 // block_size * type_size:
                                 b1 // block_size * type_size])
        CHECKPOINT_READS.add(data.nbytes)
        quant = group_quant_from_blocks(raw.ggml_type, data, (data.shape[0], b1 - b0), name)
        return quant if aligned else cut(quant, slice(None), c0, c1)

    probe = read_block(slice(0, 1), 0, inp, None)  # one row (the decoders want a block)
    return QuantSlices(read_block, (out, inp), probe, rows=rows, parts_apart=False,
                       half_groups=_HALF_GROUPS.get(raw.ggml_type, ()))


# Block types whose scales (and offsets) are the file's float16 fields themselves.
_HALF_GROUPS = {GGMLType.Q4_0: ("scales",), GGMLType.Q5_0: ("scales",),
                GGMLType.Q8_0: ("scales",), GGMLType.Q4_1: ("scales", "offsets"),
                GGMLType.Q5_1: ("scales", "offsets")}


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


def read_gguf(path: str | Path) -> tuple[dict[str, Any], GGUFTensors]:
    """(metadata as plain python values, the tensors: lazy, dequantized on access)."""
    reader = gguf.GGUFReader(path)
    if reader.byte_order != "I":
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    _refuse_split(path, metadata)
    return metadata, GGUFTensors(reader)


def _refuse_split(path: str | Path, metadata: dict[str, Any]) -> None:
    """One shard of a split GGUF holds some of the tensors: read alone, a missing
    output.weight would pass for tied embeddings. Refused, saying how to merge."""
    shards = int(metadata.get("split.count", 1))
    if shards > 1:
        raise ValueError(f"{path} is shard {int(metadata.get('split.no', 0)) + 1} of a GGUF "
                         f"split in {shards}: xla-inference reads one file; merge them first "
                         "(llama.cpp's `llama-gguf-split --merge FIRST_SHARD OUT.gguf`)")


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


def gguf_rope_parameters(metadata: dict[str, Any], rope_theta: float, head_dim: int,
                         divisors: np.ndarray | None = None) -> dict[str, Any]:
    """The rope a GGUF asks for, as llama.cpp reads it (for every architecture):
    `rope.scaling.type` (linear where the key is absent) with `rope.scaling.factor` (or the
    older `rope.scale_linear`); no factor, or a factor of 1, is plain rope. Types other than
    linear are refused, and so is `rope.scaling.attn_factor` (llama.cpp scales the rope's
    cos and sin by it) other than 1.
    divisors: the file's `rope_freqs.weight` (Llama 3.1+: llama3 scaling written as one
    divisor per frequency), read back as the llama3 parameters that give them."""
    arch = metadata["general.architecture"]
    kind = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    attn_factor = float(metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    if attn_factor != 1.0:
        raise ValueError(f"GGUF {arch}.rope.scaling.attn_factor {attn_factor}: xla-inference "
                         "does not scale the rope's cos and sin (served: 1)")
    plain = kind == "none" or (kind in (None, "linear") and float(factor or 0) in (0.0, 1.0))
    if divisors is not None:
        if not plain:
            raise ValueError(f"GGUF with rope_freqs.weight and rope scaling {kind or 'linear'} "
                             f"(factor {factor}) both: not supported")
        return {**llama3_rope_from_divisors(divisors, head_dim, rope_theta),
                "rope_theta": rope_theta}
    if plain:
        return {"rope_type": "default", "rope_theta": rope_theta}
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": float(factor), "rope_theta": rope_theta}
    raise ValueError(f"GGUF rope scaling {kind!r} ({arch}.rope.scaling.type) is not "
                     "supported; served: none, linear")


ROPE_DIVISORS = "rope_freqs.weight"
# (low_freq_factor, high_freq_factor, original_max_position_embeddings) of the llama3 rope
# scaling released (Llama 3.1, 3.2, 3.3: their config.json's; only the factor differs).
_LLAMA3_ROPE_BAND = (1.0, 4.0, 8192)


def llama3_rope_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         original: int) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for llama3 rope scaling: each
    frequency's divisor, 1 for wavelengths under original/high, `factor` over original/low,
    and between them 1 / ((1 - s) / factor + s), s rising linearly with original/wavelength."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original / high, 1.0, divisors)
    return np.where(wavelen > original / low, factor, divisors)


def llama3_rope_from_divisors(divisors: np.ndarray, head_dim: int, theta: float) -> dict:
    """The llama3 rope_parameters whose divisors (llama3_rope_divisors) are the file's;
    refused, naming the tensor, when the released band does not give them."""
    divisors = np.asarray(divisors, np.float64).reshape(-1)
    factor = float(divisors.max())
    low, high, original = _LLAMA3_ROPE_BAND
    if divisors.shape == (head_dim // 2,) and np.allclose(
            llama3_rope_divisors(head_dim, theta, factor, low, high, original), divisors,
            rtol=1e-5, atol=0):
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ValueError("GGUF tensor 'rope_freqs.weight' (a divisor per rope frequency) is not "
                     "the llama3 rope scaling of Llama 3.1-3.3; other frequency divisors are "
                     "not supported")


def refuse_bias_tensors(tensor_names: Iterable[str], arch: str) -> None:
    """llama.cpp adds a GGUF's projection biases; the families here read none from a GGUF,
    so one would be dropped: refused, naming it."""
    for name in tensor_names:
        if name.endswith(".bias"):
            raise ValueError(f"GGUF tensor {name!r}: xla-inference does not serve {arch} "
                             "GGUFs with projection biases")


def check_head_dims(metadata: dict[str, Any], head_dim: int) -> None:
    """llama.cpp turns only the first `rope.dimension_count` dimensions of each head, and
    reads values of `attention.value_length`; the families here turn whole heads whose keys
    and values are the same size."""
    rotated = int(arch_key(metadata, "rope.dimension_count", head_dim))
    if rotated != head_dim:
        raise ValueError(f"GGUF rope.dimension_count {rotated} is not the head size {head_dim}: "
                         "xla-inference turns every dimension of a head (no partial rope)")
    values = int(arch_key(metadata, "attention.value_length", head_dim))
    if values != head_dim:
        raise ValueError(f"GGUF attention.value_length {values} is not the key length "
                         f"{head_dim}: xla-inference serves heads whose keys and values are "
                         "the same size")


# Keys llama.cpp lets vary by layer (an array, one value a layer); the families here take
# one value for every layer.
_PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")


def refuse_per_layer_values(metadata: dict[str, Any]) -> None:
    arch = metadata["general.architecture"]
    for suffix in _PER_LAYER_KEYS:
        if isinstance(metadata.get(f"{arch}.{suffix}"), list):
            raise ValueError(f"GGUF {arch}.{suffix} varies by layer: xla-inference serves "
                             "the same value in every layer")


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
    a file that has its own `output.weight`. Given the tensors themselves (a mapping), a
    `rope_freqs.weight` among them is read as llama3 rope scaling.
    """
    _check_llama(metadata)
    refuse_per_layer_values(metadata)
    hidden_size = int(arch_key(metadata, "embedding_length"))
    num_heads = int(arch_key(metadata, "attention.head_count"))
    head_dim = int(arch_key(metadata, "attention.key_length", hidden_size // num_heads))
    check_head_dims(metadata, head_dim)
    rope_theta = float(arch_key(metadata, "rope.freq_base", 10000.0))
    divisors = None
    if isinstance(tensor_names, Mapping) and ROPE_DIVISORS in tensor_names:
        divisors = tensor_names[ROPE_DIVISORS]
    rope = gguf_rope_parameters(metadata, rope_theta, head_dim, divisors)
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
        "rope_parameters": rope,
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


def layer_kind(gguf_name: str) -> str | None:
    """`attn_q` of `blk.3.attn_q.weight`; None for the global tensors."""
    return gguf_name.split(".")[2] if gguf_name.startswith("blk.") else None


def hf_rope_row_order(num_rows: int, num_heads: int) -> np.ndarray:
    """The row gather that undoes llama.cpp's q/k row permutation: HF row i is GGUF row
    `hf_rope_row_order(...)[i]`.

    HF's rotary embedding pairs dimension j with j + head_dim/2 of each head ("rotate
    half"); llama.cpp pairs neighbours 2j, 2j+1, so its converter moved HF row j of a
    head to row 2j and row j + head_dim/2 to row 2j+1. Gathering even rows then odd rows
    per head puts them back.
    """
    head_dim = num_rows // num_heads
    within_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(num_heads)[:, None] * head_dim + within_head[None, :]).reshape(-1)


def check_tied(tensors: Mapping[str, Any], config: dict[str, Any]) -> None:
    if config["tie_word_embeddings"] == ("output.weight" in tensors):
        raise ValueError(f"the config's tie_word_embeddings ({config['tie_word_embeddings']}) "
                         f"disagrees with the GGUF, which {'has' if 'output.weight' in tensors else 'lacks'} "
                         f"its own output.weight")


def llama_hf_state_dict_from_gguf(tensors: Mapping[str, np.ndarray], config: dict[str, Any]) -> HFTensors:
    """GGUF tensors (numpy order) -> HF LlamaForCausalLM names and layouts, made on access."""
    check_tied(tensors, config)
    heads_of = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    recipes = {}
    refuse_bias_tensors(tensors, "llama")
    for name in tensors:
        if name == ROPE_DIVISORS:  # in the config's rope_parameters (llama_hf_config_from_gguf)
            if config.get("rope_parameters", {}).get("rope_type") != "llama3":
                raise ValueError(f"GGUF tensor {name!r} but no llama3 rope in the config")
            continue
        kind = layer_kind(name)
        rows = hf_rope_row_order(tensor_shape(tensors, name)[0], heads_of[kind]) if kind in heads_of else None
        recipes[hf_name(name)] = Recipe(name, rows=rows)
    return HFTensors(tensors, recipes)
