"""Loading a vLLM PyTorch model for the torch path: vLLM's own model class and weight
loader build the module on the host (in the model's dtype, one tensor parallel rank: our
mesh splits it, not torch.distributed) and its attention layers are pointed at our paged
cache. Its tensors become JAX arrays placed on the mesh like native weights: layer by
layer as the checkpoint streams in (torch_models/layerwise.py), or, where that does not
apply (vLLM's random weights, other loaders), as host arrays of the whole built module
that runner/build.build_engine places."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket

import torch

from xla_inference.loading.hub import local_checkpoint
from xla_inference.models.pooling_loader import refuse_extra_sentence_transformer_modules
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner.build import LoadedModel, Precision
from xla_inference.torch_models import attention, errors, layerwise, lowering, moe

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_expert_group(parallel_state) -> bool:
    try:
        parallel_state.get_ep_group()
    except AssertionError:  # vLLM builds it only for MoE models
        return False
    return True


def ensure_single_rank_groups(is_moe: bool = False) -> None:
    """vLLM's layers ask torch.distributed for their tensor parallel rank while they are
    built: one rank of one (the mesh, not torch, splits the model). vLLM makes the expert
    parallel group only with an MoE model's config: groups made earlier in this process for
    a dense model are made again."""
    from vllm.distributed import parallel_state

    if not torch.distributed.is_initialized():
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    if (is_moe and parallel_state.model_parallel_is_initialized()
            and not _has_expert_group(parallel_state)):
        parallel_state.destroy_model_parallel()
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
        ensure_single_rank_groups(vllm_config.model_config.is_moe)
        loader = get_model_loader(vllm_config.load_config)
        return loader.load_model(vllm_config=vllm_config, model_config=vllm_config.model_config)


def _architecture(vllm_config) -> str:
    archs = vllm_config.model_config.architectures or ["unknown"]
    return archs[0]


def _install(module: torch.nn.Module, vllm_config, relayout_experts: bool = True
             ) -> tuple[list, lowering.TorchModelConfig]:
    """Our MoE experts and attention on the module's layers, refusing what is not served;
    (the MoE forwards, the model's config without its parameter names)."""
    architecture = _architecture(vllm_config)
    errors.refuse_unlowered_layers(module, architecture)
    experts = moe.install(module, lambda what: errors.refuse(architecture, what),
                          relayout=relayout_experts)
    forwards = attention.install(module, vllm_config.model_config.max_model_len)
    if not forwards:
        raise errors.refuse(architecture, "models without vLLM Attention layers")
    kv_forwards = attention.paged(forwards)  # encoder-only layers keep no KV cache
    hf = vllm_config.model_config.hf_text_config
    cfg = lowering.TorchModelConfig(
        architecture=architecture,
        vocab_size=vllm_config.model_config.get_vocab_size(),
        num_heads=forwards[0].num_heads, num_kv_heads=forwards[0].num_kv_heads,
        intermediate_size=getattr(hf, "intermediate_size", 0) or 0,
        kv_layers=tuple(lowering.kv_layer(f) for f in kv_forwards),
        moe=lowering.ExpertCount(experts[0].cfg.num_experts) if experts else None,
        param_names=(), module=module)
    return experts, cfg


def lower(module: torch.nn.Module, vllm_config, precision: Precision) -> LoadedModel:
    """The module as a LoadedModel of the torch family: host arrays of every tensor (the
    torch copies are dropped as they are taken), the attention layers on our cache."""
    _, cfg = _install(module, vllm_config)
    names, params = [], []
    for name, kind, tensor in lowering.module_tensors(module):
        names.append(name)
        value = lowering.host_array(tensor)
        if kind in lowering.PROJECTIONS and precision.narrows_projections:
            value = value.astype(precision.weights)  # as runner/build.py narrows projections
        params.append(kind(value))
    _drop_parameters(module)  # the host arrays are the only copy now
    cfg = dataclasses.replace(cfg, param_names=tuple(names))
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
    own GPU or CPU kernels, which torchax cannot lower. (MoE layers are checked one by one
    once built: torch_models/moe.py.)"""
    mc = vllm_config.model_config
    if mc.quantization is not None:
        raise errors.refuse(_architecture(vllm_config),
                            f"quantized checkpoints ({mc.model} is {mc.quantization})")


# vLLM pooling model classes whose pooler our pooling runner reproduces (plugin/pooling.py:
# LAST/MEAN/CLS/ALL pooling of the final hidden states, normalization, dimensions): vLLM's
# plain embedding pooler, no head of its own, over its BertModel encoder (BERT; RoBERTa and
# XLM-RoBERTa with absolute positions; their rotary variants build another encoder).
_SERVED_POOLING_CLASSES = ("BertEmbeddingModel", "RobertaEmbeddingModel")
_SERVED_ENCODERS = ("BertModel",)


def refuse_unserved_pooling_model(module: torch.nn.Module, vllm_config) -> None:
    """A pooling model class with its own head (a classifier or cross-encoder, SPLADE's
    sparse pooler, a projector) would be served wrong by our pooling runner: refused."""
    if vllm_config.model_config.runner_type != "pooling":
        return
    mc = vllm_config.model_config
    refuse_extra_sentence_transformer_modules(  # modules.json: a hub id's too
        local_checkpoint(mc.model, mc.revision, vllm_config.load_config.download_dir,
                         weights=False))
    name = type(module).__name__
    encoder = type(getattr(module, "model", None)).__name__
    if name in _SERVED_POOLING_CLASSES and encoder not in _SERVED_ENCODERS:
        raise errors.refuse(_architecture(vllm_config),
                            f"{name} over vLLM's {encoder} encoder (served: "
                            f"{', '.join(_SERVED_ENCODERS)})")
    if name not in _SERVED_POOLING_CLASSES:
        raise errors.refuse(_architecture(vllm_config),
                            f"the pooling model class {name} (served: "
                            f"{', '.join(_SERVED_POOLING_CLASSES)}; cross-encoders, "
                            "classifiers and other heads on encoder-only models are not built)")


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


def load_layerwise(vllm_config, precision: Precision, mesh=None,
                   on_layer_done=None) -> LoadedModel | None:
    """vLLM's model class built with placeholder parameters and the checkpoint streamed
    through its load_weights a layer at a time, each layer placed on `mesh` (default: one
    of the config's tensor parallel size) once loaded (torch_models/layerwise.py); None
    where this load does not stream (the caller builds the whole module)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    mc = vllm_config.model_config
    torch.accelerator.empty_cache = lambda: None  # as in build_module
    with set_current_vllm_config(vllm_config):
        ensure_single_rank_groups(mc.is_moe)
        loader = get_model_loader(vllm_config.load_config)
        why_not, module, counts = layerwise.supported(loader, vllm_config), None, None
        if why_not is None:
            module, counts, why_not = _placeholder_module(loader, vllm_config)
        if why_not is not None:
            logger.info("xla-inference: %s is loaded whole, then placed (no layer-by-layer "
                        "load with %s)", mc.model, why_not)
            return None if module is None else _load_whole(loader, module, vllm_config,
                                                           precision)
        refuse_unserved_pooling_model(module, vllm_config)
        experts, cfg = _install(module, vllm_config, relayout_experts=False)
        if mesh is None:
            mesh = build_mesh(vllm_config.parallel_config.tensor_parallel_size)
        placement = layerwise.Placement(
            cfg, mesh, precision.weights if precision.narrows_projections else None)
        stream = layerwise.LayerwiseLoad(module, placement, mc.dtype, on_layer_done)
        for (name, _), forward in zip(moe.moe_runners(module), experts):
            stream.relayout_after(layerwise.layer_of(name + "."),
                                  lambda f=forward: moe.relayout_experts(f))
        loader._init_ep_weight_filter(mc)
        loader._init_mm_encoder_only_weight_filter(module, mc)
        stream.run(loader.get_all_weights(mc, module), counts)
        names, params = stream.finish()
        if stream.loaded_names is not None:  # vLLM's own check that nothing was left out
            loader.track_weights_loading(module, stream.loaded_names)
    cfg = dataclasses.replace(cfg, param_names=names)
    return LoadedModel(lowering.family_for(cfg.architecture), cfg, params, precision)


def _load_device(vllm_config) -> torch.device:
    return torch.device(vllm_config.load_config.device or vllm_config.device_config.device)


def _placeholder_module(loader, vllm_config):
    """(vLLM's module built with placeholder parameters, its checkpoint's tensor count per
    layer, why it cannot stream or None)."""
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc = vllm_config.model_config
    with set_default_torch_dtype(mc.dtype), _load_device(vllm_config), \
            layerwise.placeholder_parameters():
        module = loader.create_model(vllm_config=vllm_config, model_config=mc)
    why_not = layerwise.module_refusal(module)
    counts = None if why_not else layerwise.checkpoint_layer_counts(loader, mc, module)
    if why_not is None and counts is None:
        why_not = "checkpoints other than safetensors"
    elif why_not is None and layerwise.layers_missing_from(module, counts):
        why_not = "checkpoint tensors named apart from the module's layers"
    return module, counts, why_not


def _load_whole(loader, module: torch.nn.Module, vllm_config,
                precision: Precision) -> LoadedModel:
    """A module built with placeholders, loaded whole as vLLM's loader.load_model would
    (a checkpoint that does not stream), then lowered."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    layerwise.materialize_all(module)
    loader.load_weights(module, vllm_config.model_config)
    process_weights_after_loading(module, vllm_config.model_config, _load_device(vllm_config))
    refuse_unserved_pooling_model(module, vllm_config)
    return lower(module.eval(), vllm_config, precision)


def load(vllm_config, precision: Precision, mesh=None) -> LoadedModel:
    """Phase one for the torch path (runner/build.load for native families). `mesh`: the
    mesh build_engine will use (default: one of the config's tensor parallel size), on
    which a layer-by-layer load places the weights."""
    refuse_unserved(vllm_config)
    with _module_dtype(vllm_config, _TORCH_DTYPES[precision.activations.name]):
        model = load_layerwise(vllm_config, precision, mesh)
        if model is None:
            module = build_module(vllm_config)
    if model is None:
        refuse_unserved_pooling_model(module, vllm_config)
        model = lower(module, vllm_config, precision)
    moe_layers = sum(isinstance(p, lowering.ExpertsOutParam) for p in model.params)
    logger.info("xla-inference: %s through vLLM's PyTorch model class, lowered by torchax "
                "(%d tensors, %d KV cache layers, %d fused MoE layers on our experts)",
                model.cfg.architecture, len(model.cfg.param_names), len(model.cfg.kv_layers),
                moe_layers)
    return model
