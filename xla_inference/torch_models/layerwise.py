"""Loading a vLLM PyTorch model layer by layer: vLLM's model class is built with
placeholder parameters (no storage), the checkpoint streams through the model's own
`load_weights` one decoder layer at a time, and as soon as a layer's tensors are all in,
its parameters become JAX arrays placed on the mesh by our sharding rules
(torch_models/lowering.py's kinds, parallel/sharding.py) and their torch storage is
released. The host then holds about one layer of torch tensors (the checkpoint tensors of
the layer being loaded and its parameters) beside what is already placed, where building
the whole module first held the whole model twice over.

The layers are told apart by the `layers.<i>.` in a name, in the checkpoint's names and
the module's alike (vLLM's decoders build `model.layers` with make_layers). A layer is
complete once the checkpoint has yielded as many of its tensors as the checkpoint's files
declare (their safetensors headers, read up front): the stream need not keep a layer's
tensors together (safetensors files list names in sorted order, and a layer can straddle
two files). Tensors of no layer (embeddings, the final norm, the output projection) load
into parameters kept whole until the end.

A parameter built with a placeholder is a one-element storage expanded to its shape:
writing into it before its layer is materialized fails loudly (torch refuses to copy into
an expanded tensor) instead of loading silently nowhere. What this streaming does not
cover (vLLM's random weights, other loaders and formats, model-level or deferred
post-load hooks) goes through loader.build_module as before (`supported`)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re

import torch

from xla_inference.parallel.sharding import param_shardings, place
from xla_inference.torch_models import lowering

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Parameters smaller than this are built whole: norms and biases whose module fills them
# at construction (a norm's ones) keep those values if a checkpoint leaves them out.
_PLACEHOLDER_MIN_ELEMENTS = 1 << 16


def layer_of(name: str) -> int | None:
    """The decoder layer a checkpoint or module name belongs to (None: no layer)."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


# -- placeholder parameters -------------------------------------------------------------------
def _placeholder(param: torch.Tensor) -> torch.Tensor:
    return torch.empty((1,) * param.ndim, dtype=param.dtype).expand(param.shape)


def is_placeholder(param: torch.Tensor) -> bool:
    return param.numel() > 1 and param.untyped_storage().nbytes() < param.nbytes


@contextlib.contextmanager
def placeholder_parameters():
    """While vLLM builds the module: every parameter of at least _PLACEHOLDER_MIN_ELEMENTS
    is registered with a placeholder in place of its storage, which is freed at once.
    The Parameter objects (vLLM's weight loaders and attributes on them, ties between
    modules) are kept; only their data is swapped, now and when materialized."""
    original = torch.nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.numel() >= _PLACEHOLDER_MIN_ELEMENTS:
            param.data = _placeholder(param)
        return original(self, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _materialize(param: torch.Tensor) -> None:
    if is_placeholder(param):
        param.data = torch.empty(param.shape, dtype=param.dtype)


def _release(param: torch.Tensor) -> None:
    """The torch storage dropped (functional_call supplies the placed value)."""
    param.data = torch.empty(0, dtype=param.dtype)


# -- which loads stream ----------------------------------------------------------------------
def supported(loader, vllm_config) -> str | None:
    """Why this load cannot stream (None: it can)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if type(loader) is not DefaultModelLoader:
        return f"the {type(loader).__name__}"
    if vllm_config.load_config.load_format not in ("auto", "safetensors"):
        return f"load format {vllm_config.load_config.load_format}"
    return None


def module_refusal(module: torch.nn.Module) -> str | None:
    """Post-load steps that read the whole model at once (no streaming for them)."""
    if hasattr(module, "process_weights_after_loading"):
        return "a model-level post-load hook"
    if getattr(module, "secondary_weights", ()):
        return "secondary weight sources"
    return None


def materialize_all(module: torch.nn.Module) -> None:
    """Every placeholder given its storage (a load that does not stream)."""
    for param in module.parameters():
        _materialize(param)


def checkpoint_layer_counts(loader, model_config, module) -> collections.Counter | None:
    """How many checkpoint tensors each layer has (key None: no layer), from the headers
    of the files vLLM's loader will read; None where they are not safetensors."""
    from safetensors import safe_open

    _, files, use_safetensors, _ = loader._prepare_weights(
        model_config.model, None, model_config.revision,
        getattr(module, "fall_back_to_pt_during_load", True),
        getattr(module, "allow_patterns_overrides", None))
    if not use_safetensors:
        return None
    counts = collections.Counter()
    for path in files:
        with safe_open(path, framework="pt") as f:
            counts.update(layer_of(name) for name in f.keys())
    return counts


def layers_missing_from(module: torch.nn.Module, counts: collections.Counter) -> list[int]:
    """The module's layers of which the checkpoint has no tensor by that layer number
    (names that differ beyond `layers.<i>.`): such a model cannot stream."""
    found = {layer_of(name + ".") for name, sub in module.named_modules()
             if any(p is not None for p in sub._parameters.values())}
    return sorted(layer for layer in found - {None} if counts[layer] == 0)


# -- the stream -------------------------------------------------------------------------------
@dataclasses.dataclass
class Placement:
    """How a torch tensor becomes a placed JAX array: the kind its vLLM layer gives it,
    the precision policy's narrowing of projections, our sharding rules on the mesh."""

    cfg: object  # lowering.TorchModelConfig (its sizes decide what splits evenly)
    mesh: object
    narrow_to: object  # the projections' dtype, or None

    def __call__(self, owner: torch.nn.Module, name: str, tensor: torch.Tensor):
        kind = lowering._param_kind(owner, name, tensor.ndim)
        value = lowering.host_array(tensor)
        if kind in lowering.PROJECTIONS and self.narrow_to is not None:
            value = value.astype(self.narrow_to)
        sharding = param_shardings(kind(value), self.cfg, self.mesh).value
        return kind(place(value, sharding))


class LayerwiseLoad:
    """One streaming load of `module` (built under placeholder_parameters)."""

    def __init__(self, module: torch.nn.Module, placement: Placement, dtype: torch.dtype,
                 on_layer_done=None):
        self.module, self.placement, self.dtype = module, placement, dtype
        self.layer_modules = collections.defaultdict(list)  # layer -> [(name, module)]
        for name, sub in module.named_modules():
            self.layer_modules[layer_of(name + ".")].append((name, sub))
        self.placed = {}  # id(tensor) -> the placed kind
        self.loaded_names = set()  # what load_weights reports (None: a model that does not)
        self.done_layers = set()
        self.relayout = {}  # layer -> [callables laying out its MoE experts]
        self.on_layer_done = on_layer_done  # a test's probe: (layer) after it is placed

    def relayout_after(self, layer: int | None, lay_out) -> None:
        """lay_out() once `layer` is loaded, before it is placed (MoE experts' layout)."""
        self.relayout.setdefault(layer, []).append(lay_out)

    def run(self, weights, counts: collections.Counter) -> None:
        for _, sub in self.layer_modules[None]:
            for param in sub._parameters.values():
                if param is not None:
                    _materialize(param)
        pending = collections.defaultdict(list)
        for name, tensor in weights:
            layer = layer_of(name)
            if layer is None:
                self._load([(name, tensor)])
                continue
            if layer in self.done_layers:
                raise RuntimeError(f"the checkpoint yielded {name} after layer {layer} was "
                                   "complete and placed (its files declare fewer tensors "
                                   "for it than the stream carries)")
            pending[layer].append((name, tensor))
            if len(pending[layer]) == counts[layer]:
                self._finish_layer(layer, pending.pop(layer))
        for layer in sorted(pending):  # filtered by vLLM's loader: fewer than declared
            self._finish_layer(layer, pending.pop(layer))

    def _load(self, tensors) -> None:
        try:
            loaded = self.module.load_weights(tensors)
        except RuntimeError as e:
            if "more than one element of the written-to tensor" not in str(e):
                raise
            raise RuntimeError(f"xla-inference's layer-by-layer load: {tensors[0][0]} loads "
                               "into a parameter whose layer has not streamed yet (the "
                               "checkpoint names its layers apart from the module)") from e
        if loaded is None:
            self.loaded_names = None
        elif self.loaded_names is not None:
            self.loaded_names.update(loaded)

    def _finish_layer(self, layer: int, tensors) -> None:
        modules = self.layer_modules[layer]
        for _, sub in modules:
            for param in sub._parameters.values():
                if param is not None:
                    _materialize(param)
        self._load(tensors)
        del tensors[:]  # the checkpoint's copies go now, not when the caller lets go
        _post_process(modules, self.dtype)
        for lay_out in self.relayout.get(layer, ()):
            lay_out()
        self._place(modules)
        self.done_layers.add(layer)
        if self.on_layer_done is not None:
            self.on_layer_done(layer)

    def _place(self, modules) -> None:
        for name, sub in modules:
            for attr, param in sub._parameters.items():
                if param is None or id(param) in self.placed:
                    continue
                if is_placeholder(param):
                    raise ValueError(f"the checkpoint does not initialize "
                                     f"{name}.{attr} (shape {tuple(param.shape)})")
                self.placed[id(param)] = self.placement(sub, f"{name}.{attr}", param.detach())
                _release(param)

    def finish(self) -> tuple[tuple[str, ...], tuple]:
        """Place what is not in a layer, and every buffer (rotary tables: kept on the module
        as well, vLLM shares them); the names and placed values in module order."""
        rest = self.layer_modules[None]
        _post_process(rest, self.dtype)
        for lay_out in self.relayout.get(None, ()):
            lay_out()
        self._place(rest)
        owners = dict(self.module.named_modules())
        names, params = [], []
        for name, tensor in self.module.named_parameters():
            names.append(name)
            params.append(self.placed[id(tensor)])
        for name, tensor in self.module.named_buffers():
            names.append(name)
            params.append(self.placement(owners[name.rpartition(".")[0]], name, tensor))
        return tuple(names), tuple(params)


def _post_process(modules, dtype: torch.dtype) -> None:
    """vLLM's post-load steps, as its loader runs them over the whole model
    (model_loader/utils.process_weights_after_loading), over one layer's modules: each
    quantization method's (the unquantized ones' on this platform), then each attention
    layer's (default scales)."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    for _, sub in modules:
        method = getattr(sub, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            method.process_weights_after_loading(sub)
    for _, sub in modules:
        if is_deferred_attention_layer(sub):
            sub.process_weights_after_loading(dtype)
