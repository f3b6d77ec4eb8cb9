"""Shared fixtures for tests that drive vLLM itself on the real SmolLM2 model."""

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from xla_inference.loading.default_model import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from xla_inference.loading.default_model import default_gguf_path

    return default_gguf_path()
