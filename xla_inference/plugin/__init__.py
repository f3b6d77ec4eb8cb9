"""vLLM adapter: the only package that imports vllm (and torch)."""

import os


def register() -> str | None:
    """Entry point of `vllm.platform_plugins`: the qualname of our Platform."""
    # The V2 model runner switches itself on when Triton imports and changes what the
    # scheduler sends; our runner implements the V1 contract.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # No vLLM config imports here: this runs while vLLM is still choosing the platform, and
    # a module imported now would bind a CPU platform as its `current_platform`.
    return "xla_inference.plugin.platform.XlaPlatform"
