"""Loading a vLLM PyTorch model for the torch path: vLLM's own model class and weight
loader build the module on the host (in the model's dtype, one tensor parallel rank: our
mesh splits it, not torch.distributed), its attention layers are pointed at our paged
cache, and its tensors become host arrays that runner/build.build_engine places on the
mesh like native weights."""

from __future__ import annotations

import contextlib
import logging
import socket

import torch

from xla_inference.runner.build import LoadedModel, Precision
from xla_inference.torch_models import attention, errors, lowering

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_rank_groups() -> None:
    """vLLM's layers ask torch.distributed for their tensor parallel rank while they are
    built: one rank of one (the mesh, not torch, splits the model)."""
    from vllm.distributed import parallel_state

    if not torch.distributed.is_initialized():
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.ensure_model_parallel_initialized(1, 1)


def build_module(vllm_config) -> torch.nn.Module:
    """vLLM's model for the config, its weights loaded by vLLM's loader (--load-format
    dummy: vLLM's random weights)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    # vLLM's loader empties the accelerator's cache. Torch runs on the host here; its only
    # accelerator is torchax's "jax" device, whose allocator refuses the call.
    torch.accelerator.empty_cache = lambda: None
    with set_current_vllm_config(vllm_config):
        ensure_single_rank_groups()
        loader = get_model_loader(vllm_config.load_config)
        return loader.load_model(vllm_config=vllm_config, model_config=vllm_config.model_config)


def _architecture(vllm_config) -> str:
    archs = vllm_config.model_config.architectures or ["unknown"]
    return archs[0]


def lower(module: torch.nn.Module, vllm_config, precision: Precision) -> LoadedModel:
    """The module as a LoadedModel of the torch family: host arrays of every tensor (the
    torch copies are dropped as they are taken), the attention layers on our cache."""
    errors.refuse_unlowered_layers(module, _architecture(vllm_config))
    forwards = attention.install(module)
    if not forwards:
        raise errors.refuse(_architecture(vllm_config), "models without vLLM Attention layers")
    names, params = [], []
    for name, kind, tensor in lowering.module_tensors(module):
        names.append(name)
        value = lowering.host_array(tensor)
        if kind in lowering.PROJECTIONS and precision.narrows_projections:
            value = value.astype(precision.weights)  # as runner/build.py narrows projections
        params.append(kind(value))
    _drop_parameters(module)  # the host arrays are the only copy now
    hf = vllm_config.model_config.hf_text_config
    num_heads = forwards[0].num_heads
    cfg = lowering.TorchModelConfig(
        architecture=_architecture(vllm_config),
        vocab_size=vllm_config.model_config.get_vocab_size(),
        num_heads=num_heads, num_kv_heads=forwards[0].num_kv_heads,
        intermediate_size=getattr(hf, "intermediate_size", 0) or 0,
        kv_layers=tuple(lowering.kv_layer(f) for f in forwards),
        param_names=tuple(names), module=module)
    return LoadedModel(lowering.family_for(cfg.architecture), cfg, tuple(params), precision)


def _drop_parameters(module: torch.nn.Module) -> None:
    """Replace every parameter by an empty one of its dtype (functional_call supplies the
    values), keeping tied parameters tied: functional_call finds ties by identity. Buffers
    (rotary tables) are kept: vLLM shares one rotary module between models of the same
    settings (get_rope's cache), and they are small."""
    replacements = {}
    for owner in module.modules():
        for attr, param in owner._parameters.items():
            if param is None:
                continue
            if id(param) not in replacements:
                empty = torch.nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False)
                replacements[id(param)] = (param, empty)
            owner._parameters[attr] = replacements[id(param)][1]


def refuse_unserved(vllm_config) -> None:
    """What the torch path would otherwise serve wrongly: vLLM's quantized layers call its
    own GPU or CPU kernels, which torchax cannot lower."""
    mc = vllm_config.model_config
    if mc.is_moe:  # known from the config: refused before anything is built
        raise errors.refuse(_architecture(vllm_config), "mixture-of-experts layers (vLLM's "
                            "fused MoE, whose kernels torchax cannot lower)")
    if mc.quantization is not None:
        raise errors.refuse(_architecture(vllm_config),
                            f"quantized checkpoints ({mc.model} is {mc.quantization})")


@contextlib.contextmanager
def _module_dtype(vllm_config, dtype: torch.dtype):
    """vLLM builds the module in model_config.dtype; build it in `dtype` (the precision
    policy's activations: float32 on the host CPU for a bfloat16 model)."""
    mc = vllm_config.model_config
    saved, mc.dtype = mc.dtype, dtype
    try:
        yield
    finally:
        mc.dtype = saved


def load(vllm_config, precision: Precision) -> LoadedModel:
    """Phase one for the torch path (runner/build.load for native families)."""
    refuse_unserved(vllm_config)
    with _module_dtype(vllm_config, _TORCH_DTYPES[precision.activations.name]):
        module = build_module(vllm_config)
    model = lower(module, vllm_config, precision)
    logger.info("xla-inference: %s through vLLM's PyTorch model class, lowered by torchax "
                "(%d tensors, %d attention layers)", model.cfg.architecture,
                len(model.cfg.param_names), len(model.cfg.kv_layers))
    return model
