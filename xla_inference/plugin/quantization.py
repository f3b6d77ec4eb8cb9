"""vLLM's side of quantized serving: which of vLLM's quantization methods xla-inference
serves, the method names vLLM does not know that it adds (online `int8`, `gguf`), and the
one vLLM config check it relaxes for them. Runs in the front-end too: keep JAX out of it.

vLLM names a model's method in `model_config.quantization`, from `--quantization` or the
checkpoint's `quantization_config.quant_method`; on a platform that is not its own CPU one
it renames an AWQ checkpoint's "awq" to "auto_awq" and a GPTQ one's "gptq" to "auto_gptq"
(their `override_quantization_method`). The worker hands the loader the format's own name
(`loader_method`). The scheme inside the format (bits, group size, activation scheme) is
validated by the loader's own readers, already at config time in the front-end
(`refuse_unserved_quantization`), so that what they cannot read never starts an engine."""

from __future__ import annotations

import copy

import torch

# vLLM's method name -> the name runner.build.load takes. "int8" and "gguf" are ours
# (plugin/quant_configs.py); "fp8" is both an FP8 checkpoint and, on an unquantized one, vLLM's
# online FP8; "int8" is online only.
_LOADER_METHOD = {
    "compressed-tensors": "compressed-tensors",
    "awq": "awq", "auto_awq": "awq", "awq_marlin": "awq",
    "gptq": "gptq", "auto_gptq": "gptq", "gptq_marlin": "gptq",
    "fp8": "fp8",
    "int8": "int8",
    "gguf": "gguf",
}
SERVED_METHODS: tuple[str, ...] = tuple(_LOADER_METHOD)
_SERVED_SUMMARY = ("checkpoints quantized with compressed-tensors (W8A8 int8, FP8, W4A16), "
                   "awq, gptq or fp8, GGUF files, and --quantization int8 or fp8 on an "
                   "unquantized checkpoint (weights quantized at load)")


def loader_method(vllm_method: str | None) -> str | None:
    """The method name runner.build.load takes for vLLM's `model_config.quantization`
    (None: not quantized)."""
    if vllm_method is None:
        return None
    refuse_unserved(vllm_method)
    return _LOADER_METHOD[vllm_method]


def refuse_unserved(method: str | None, source: str = "") -> None:
    """Raise, naming the method (and where it came from) and what is served, unless
    xla-inference serves `method`."""
    if method and method not in _LOADER_METHOD:
        where = f" ({source})" if source else ""
        raise ValueError(f"xla-inference does not support quantization {method!r}{where}; "
                         f"it serves {_SERVED_SUMMARY} (methods: {', '.join(SERVED_METHODS)})")


def register_methods() -> None:
    """Make vLLM accept our method names (idempotent)."""
    from vllm.model_executor.layers import quantization as vllm_quantization

    from xla_inference.plugin.quant_configs import CONFIGS

    for config in CONFIGS:
        if config.name not in vllm_quantization.QUANTIZATION_METHODS:
            vllm_quantization.register_quantization_config(config.name)(config)


def refuse_unserved_quantization(model_config_cls) -> None:
    """Wrap vLLM's quantization check of a ModelConfig: the method names, the flag's and the
    checkpoint's, are checked before vLLM resolves them (a method vLLM does not know, such
    as bitsandbytes or hqq, would otherwise fail with vLLM's list of its own methods, most
    of which xla-inference does not serve), and after vLLM's checks the checkpoint's scheme
    is checked by the format readers the engine will load it with, so that a scheme they
    cannot read (NVFP4, static activation scales, AWQ gemv, 3-bit GPTQ, ...) is refused at
    start-up, in the front-end, rather than when the engine core loads the weights."""
    original = model_config_cls._verify_quantization
    if getattr(original, "_xla_inference", False):
        return

    def verify(self):
        refuse_unserved(self.quantization, "from --quantization")
        checkpoint = self.model_arch_config.quantization_config or {}
        refuse_unserved(checkpoint.get("quant_method"), "from the checkpoint's "
                        "quantization_config")
        result = original(self)  # resolves self.quantization (flag or checkpoint)
        if self.quantization is not None and self.quantization_config is not None:
            # Per-layer online specs (vLLM applies them with a method, online or over a
            # checkpoint's): the loader would ignore them and serve something else than
            # asked. Without a method vLLM ignores them too.
            raise ValueError("xla-inference does not support --quantization-config (vLLM's "
                             "per-layer online quantization specs); use --quantization int8 "
                             "or fp8 to quantize an unquantized checkpoint at load")
        if checkpoint:
            _refuse_unreadable_scheme(dict(checkpoint), loader_method(self.quantization))
        return result

    verify._xla_inference = True
    model_config_cls._verify_quantization = verify


def _refuse_unreadable_scheme(quantization_config: dict, method: str | None) -> None:
    """The loader's own validation of a checkpoint's quantization_config (it raises
    ValueError naming the scheme found and listing what is supported). Reads no tensors and
    imports no JAX."""
    from xla_inference.loading.checkpoint import quantized_reader

    quantized_reader(quantization_config, method)


def accept_float32_activations(vllm_config_cls) -> None:
    """vLLM refuses AWQ, GPTQ and FP8 (checkpoint or online) unless the model dtype is
    float16 or bfloat16, because its GPU kernels take 16-bit activations. Ours take float32
    too, and float32 is what dtype="auto" gives on a host CPU without avx512_bf16 (and what
    exact tests ask for): for the methods we serve, vLLM's check is run as for bfloat16,
    and the model keeps its float32 dtype."""
    original = vllm_config_cls._get_quantization_config
    if getattr(original, "_xla_inference", False):
        return

    def get_quantization_config(model_config, load_config):
        if model_config.dtype == torch.float32 and model_config.quantization in _LOADER_METHOD:
            model_config = copy.copy(model_config)
            object.__setattr__(model_config, "dtype", torch.bfloat16)
        return original(model_config, load_config)

    get_quantization_config._xla_inference = True
    vllm_config_cls._get_quantization_config = staticmethod(get_quantization_config)
