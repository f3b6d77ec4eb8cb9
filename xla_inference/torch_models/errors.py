"""What the torch path cannot serve, said before serving and by name: layers it does not
lower (refused when the model is loaded), and torch ops torchax has no lowering for (named
with the module that called them when the step is first traced, at warm-up). Each error
suggests --model-impl native where a native family serves the architecture."""

from __future__ import annotations

import contextlib

import torch


class TorchPathError(NotImplementedError):
    """The torch path cannot serve this model; the message says what and what does."""


def _native_hint(architecture: str) -> str:
    from xla_inference.models.registry import native_family

    family = native_family([architecture])
    if family is not None:
        return f"--model-impl native serves {architecture} (family {family.name})"
    return f"xla-inference has no native family for {architecture} either"


def refuse(architecture: str, what: str) -> TorchPathError:
    return TorchPathError(f"{architecture}: xla-inference's torch path (vLLM's PyTorch model "
                          f"through torchax) does not serve {what} yet; "
                          f"{_native_hint(architecture)}")


def _unlowered_layers() -> list[tuple[type, str]]:
    """vLLM layer kinds that call vLLM's own kernels through opaque custom ops (or keep
    state outside the paged KV cache), which the torch path has no JAX form of yet. (vLLM's
    fused MoE runners are served, or refused variant by variant: torch_models/moe.py.)"""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return [(AttentionLayerBase, "attention layers other than vLLM's Attention (MLA, "
                                 "Mamba, linear attention)")]


def refuse_unlowered_layers(module: torch.nn.Module, architecture: str) -> None:
    from vllm.model_executor.layers.attention import EncoderOnlyAttention
    from vllm.model_executor.layers.attention.attention import Attention

    kinds = _unlowered_layers()
    for name, sub in module.named_modules():
        # The attention layers torch_models/attention.py serves.
        if type(sub) in (Attention, EncoderOnlyAttention):
            continue
        for kind, what in kinds:
            if isinstance(sub, kind):
                raise refuse(architecture, f"{what} ({name}: {type(sub).__name__})")


@contextlib.contextmanager
def naming_the_module(module: torch.nn.Module, architecture: str):
    """While the module is traced: an op torchax cannot lower is re-raised naming the op,
    the innermost module that called it, and what serves the architecture."""
    names = {id(m): name for name, m in module.named_modules()}
    stack: list[str] = []

    def enter(mod, args):
        stack.append(f"{names.get(id(mod), '?')} ({type(mod).__name__})")

    def leave(mod, args, out):
        if stack:
            stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield
    except Exception as error:
        if not _is_lowering_failure(error):
            raise
        where = stack[-1] if stack else "the model"
        raise TorchPathError(
            f"{architecture}: torchax cannot lower an op in {where}: {error}. "
            f"{_native_hint(architecture)}") from error
    finally:
        for hook in hooks:
            hook.remove()


def _is_lowering_failure(error: Exception) -> bool:
    """torchax's "no lowering" error, or its refusal of an op that ran outside it (a torch
    custom op whose kernel torchax does not know)."""
    return (type(error).__name__ == "OperatorNotFound"
            or "can only do math within the torchax environment" in str(error))
