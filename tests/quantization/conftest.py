"""Session-wide tiny quantized checkpoints (tests/quantization/checkpoints.py), each built on
first use under one pytest temporary directory and shared by every test that asks."""

import pytest

from tests.quantization import checkpoints


@pytest.fixture(scope="session")
def quantized_checkpoint(tmp_path_factory):
    """quantized_checkpoint(name) -> checkpoints.QuantizedCheckpoint, for a name of
    checkpoints.CHECKPOINTS; built once per session from one float base model."""
    root = tmp_path_factory.mktemp("quantized_checkpoints")
    built = {}

    def get(name: str) -> checkpoints.QuantizedCheckpoint:
        if "base" not in built:
            built["base"] = checkpoints.save_base_model(root / "base")
        if name not in built:
            built[name] = checkpoints.build(name, root / name, built["base"])
        return built[name]

    return get


@pytest.fixture(scope="session")
def dequantized_checkpoint(quantized_checkpoint, tmp_path_factory):
    """dequantized_checkpoint(name) -> Path of the float32 model whose weights are the
    reference dequantization of quantized_checkpoint(name) (checkpoints.save_dequantized)."""
    root = tmp_path_factory.mktemp("dequantized_checkpoints")
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = checkpoints.save_dequantized(quantized_checkpoint(name), root / name)
        return built[name]

    return get
