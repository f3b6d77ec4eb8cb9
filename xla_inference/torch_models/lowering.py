"""A vLLM PyTorch model as a model family of ours (models/interface.ModelFamily), so that
the runner's engine (runner/engine.py: buckets, the jitted step, the donated cache, the
device sampler) serves it unchanged.

The parameters (and buffers: rotary tables) become a tuple of `TorchParam`s, one per
module tensor, each declaring the logical axes its vLLM layer splits over tensor parallel
ranks (column parallel: the output rows, row parallel: the input columns, vocabulary
parallel: the rows), so parallel/sharding.py places them as it places the native weights;
anything else is replicated. Under GSPMD any placement computes the same numbers, so the
axes decide only where the work and the weights go.

The step: `forward` hands the parameters, as torchax tensors, to the module through
`torch.func.functional_call` inside the torchax environment (every torch op becomes a JAX
op while jax.jit traces), with the step's cache and metadata beside it for the attention
layers (torch_models/attention.py)."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch

from xla_inference.layers.bidirectional_attention import token_segments
from xla_inference.layers.linear import linear
from xla_inference.models.interface import FULL, SLIDING, KvLayer, ModelFamily, StepBatch
from xla_inference.parallel.axes import weight
from xla_inference.torch_models import attention, errors
from xla_inference.torch_models import lora as torch_lora
from xla_inference.torch_models.step import from_torch, to_torch  # noqa: F401 (callers')
from xla_inference.torch_models.torchax_compat import import_torchax

torchax = import_torchax()


_linear_installed = False


def _env():
    """torchax's environment, with torch's linear as our projection (layers/linear.py): a
    weight narrower than the activations (bfloat16 projections, float32 activations on the
    host CPU) multiplies in its own dtype with float32 accumulation, as the native families'
    projections do, instead of torchax's einsum, which would widen it every step."""
    global _linear_installed
    env = torchax.default_env()
    if not _linear_installed:
        env.override_op_definition(torch.nn.functional.linear, _projection)
        _linear_installed = True
    return env


def _projection(x, w, b=None):
    x, w, b = from_torch((x, w, b))
    return to_torch(torch_lora.add_delta(x, w, linear(x, w, b)))  # + an adapter's, if any


# -- parameters ------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TorchParam:
    value: jax.Array  # replicated


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ColumnParam:
    value: jax.Array = weight("mlp", None)  # [out, ...]: the output rows split


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowParam:
    value: jax.Array = weight(None, "mlp")  # [out, in]: the input columns split


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VocabParam:
    value: jax.Array = weight("vocab", None)  # [V, D]: the vocabulary rows split


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LmHeadParam:
    value: jax.Array = weight("vocab", None)  # [V, D]: an untied output projection


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertsInParam:
    value: jax.Array = weight("experts", "embed", "mlp")  # [E, D, F]: w_gate, w_up


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertsOutParam:
    value: jax.Array = weight("experts", "mlp", "embed")  # [E, F, D]: w_down


# The experts' tensors, as torch_models/moe.py lays them out on vLLM's routed experts.
_EXPERT_KINDS = {"w_gate": ExpertsInParam, "w_up": ExpertsInParam, "w_down": ExpertsOutParam}

# Kinds whose weights are projections: stored in the precision policy's weight dtype.
PROJECTIONS = (ColumnParam, RowParam, LmHeadParam)


def _param_kind(module: torch.nn.Module, name: str, ndim: int):
    """The placement of a module tensor, from the kind of vLLM layer that owns it."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                     VocabParallelEmbedding)

    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, RoutedExperts) and leaf in _EXPERT_KINDS and ndim == 3:
        return _EXPERT_KINDS[leaf]
    if leaf != "weight" or ndim != 2:
        return TorchParam
    if isinstance(module, ParallelLMHead):
        return LmHeadParam
    if isinstance(module, VocabParallelEmbedding):
        return VocabParam
    if isinstance(module, RowParallelLinear):
        return RowParam
    if isinstance(module, ColumnParallelLinear):
        return ColumnParam
    return TorchParam


def module_tensors(module: torch.nn.Module) -> list[tuple[str, type, torch.Tensor]]:
    """Every parameter and buffer (name, placement, tensor), in a fixed order."""
    owners = dict(module.named_modules())
    found = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        owner = owners[name.rpartition(".")[0]]
        found.append((name, _param_kind(owner, name, tensor.ndim), tensor))
    return found


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor's values as numpy (bfloat16 through ml_dtypes)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


# -- the family ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExpertCount:
    num_experts: int


@dataclasses.dataclass(frozen=True, eq=False)
class TorchModelConfig:
    """What the runner and the sharding rules read of a model config, and the module."""

    architecture: str
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int  # units of the "mlp" axis: every split dimension divides by it
    kv_layers: tuple[KvLayer, ...]
    moe: ExpertCount | None  # the experts axis' units (parallel/sharding.logical_sizes)
    param_names: tuple[str, ...]
    module: torch.nn.Module


class _Entry(torch.nn.Module):
    """Calls a method of the model by name, so that functional_call reaches compute_logits
    as well as forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args):
        return getattr(self.model, method)(*args)


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module):
    """Every buffer of the module as it was, after the call: functional_call swaps them in
    and out, but a buffer shared between submodules (vLLM's rotary module, one per model
    settings) can come back holding the traced value, which must not outlive the trace."""
    saved = [(owner, name, buf) for owner in module.modules()
             for name, buf in owner._buffers.items()]
    try:
        yield
    finally:
        for owner, name, buf in saved:
            owner._buffers[name] = buf


@contextlib.contextmanager
def _tracing():
    """Tell vLLM's layers that their forward is being traced into a graph, as under
    torch.compile: they then keep their state as it is (the rotary embedding would store a
    converted table on itself, which under jax.jit would be a tracer outliving the trace)."""
    saved = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = saved


def _call(cfg: TorchModelConfig, params, method: str, *args):
    from vllm.ir.op import enable_torch_wrap

    tensors = {f"model.{name}": to_torch(p.value) for name, p in zip(cfg.param_names, params)}
    # vLLM's IR ops (RMSNorm, activations) straight to their implementations, not through
    # the torch custom ops that wrap them for torch.compile (torchax lowers the torch ops
    # those implementations are written in, not the opaque wrappers).
    with _env(), enable_torch_wrap(False), _tracing(), _buffers_kept(cfg.module), \
            errors.naming_the_module(cfg.module, cfg.architecture):
        out = torch.func.functional_call(_Entry(cfg.module), tensors, (method, *to_torch(args)),
                                         tie_weights=True, strict=False)
    return from_torch(out)


def forward(params, kv_cache, batch: StepBatch, cfg: TorchModelConfig):
    md = batch.attention
    # Encoder-only layers attend within each request's tokens (unused, and dropped by XLA,
    # in a model without them).
    segments = token_segments(md.seq_ids, batch.logits_indices)
    with attention.step_context(kv_cache, md, segments) as step, \
            torch_lora.active(params) as params:
        hidden = _call(cfg, params, "forward", batch.input_ids, md.positions)
    return step.kv_cache, hidden


def compute_logits(params, hidden, cfg: TorchModelConfig):
    return _call(cfg, params, "compute_logits", hidden).astype(jnp.float32)


def kv_layers(cfg: TorchModelConfig) -> list[KvLayer]:
    return list(cfg.kv_layers)


def _unused(*args, **kwargs):
    raise NotImplementedError("the torch path loads through vLLM's model loader "
                              "(torch_models/loader.py)")


def family_for(architecture: str) -> ModelFamily:
    return ModelFamily(name=f"vllm:{architecture}", architectures=(architecture,),
                       config_from_hf=_unused, load_params=_unused, forward=forward,
                       compute_logits=compute_logits, kv_layers=kv_layers,
                       lora=torch_lora.SUPPORT)


def kv_layer(fwd: attention.PagedAttentionForward) -> KvLayer:
    if fwd.head_size_v != fwd.head_size:
        raise NotImplementedError("xla-inference's torch path does not serve attention whose "
                                  "values are narrower or wider than its keys")
    if fwd.sliding_window is not None:
        return KvLayer(SLIDING, fwd.num_kv_heads, fwd.head_size, fwd.sliding_window)
    return KvLayer(FULL, fwd.num_kv_heads, fwd.head_size)
