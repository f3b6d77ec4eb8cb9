"""vLLM's `Attention` layers on our paged KV cache.

vLLM builds every decoder model's attention as its `Attention` module
(vllm/model_executor/layers/attention/attention.py), which asks the platform for an
attention backend while the model is constructed. This platform names
`XlaAttentionBackend` (plugin/platform.get_attn_backend_cls); its impl only records the
layer's settings. At lowering, each `Attention` module's forward is replaced by
`PagedAttentionForward`, which takes the query, key and value the model computed (torchax
tensors over JAX arrays) and calls layers/attention.paged_attention, the native families'
kernel call, on the step's cache and metadata (`step_context`): the same write of the new
K/V, the same ragged attention, the same donated cache."""

from __future__ import annotations


import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionType

from xla_inference.layers.attention import paged_attention
from xla_inference.layers.bidirectional_attention import bidirectional_attention
from xla_inference.torch_models.step import _current, step_context  # noqa: F401 (lowering's)

BACKEND_QUALNAME = "xla_inference.torch_models.attention.XlaAttentionBackend"


# Decoder layers run paged attention on our cache; encoder-only layers (BERT-style
# embedders) keep no cache and attend over their prompt's tokens both ways.
_SERVED_ATTN_TYPES = (AttentionType.DECODER, AttentionType.ENCODER_ONLY)


class XlaAttentionImpl(AttentionImpl):
    """The layer's settings as vLLM hands them over; attention itself runs in
    PagedAttentionForward (the module's forward is replaced before any step)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, **extra):
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.attn_type = attn_type
        self.refusals = [reason for present, reason in (
            (alibi_slopes is not None, "ALiBi position biases"),
            (attn_type not in _SERVED_ATTN_TYPES, f"attention type {attn_type}"),
            (kv_sharing_target_layer_name is not None, "KV cache sharing between layers"),
            (extra.get("sinks") is not None, "attention sinks"),
        ) if present]

    def forward(self, *args, **kwargs):
        raise RuntimeError("xla-inference runs vLLM attention layers through "
                           "torch_models.attention.PagedAttentionForward; this impl is never "
                           "called")


class XlaAttentionBackend(AttentionBackend):
    """Registered for construction only: the step never goes through vLLM's metadata
    builder or KV cache binding."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM's enum member for backends from outside vLLM

    @staticmethod
    def get_impl_cls():
        return XlaAttentionImpl

    @staticmethod
    def get_builder_cls():
        # vLLM's EncoderOnlyAttention subclasses the backend's builder while the model is
        # built; it is never instantiated here.
        return _UnusedMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_sink(cls) -> bool:
        return False


class _UnusedMetadataBuilder:
    """The step never goes through vLLM's metadata builders."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("xla-inference builds its own attention metadata")


class PagedAttentionForward:
    """Replaces one vLLM `Attention` module's forward: q [T, N*H], k/v [T, K*H] (torchax
    tensors) -> out [T, N*Hv], through KV cache layer `index`."""

    def __init__(self, index: int, layer):
        impl = layer.impl
        if impl.refusals:
            raise NotImplementedError(f"{layer.layer_name}: xla-inference's torch path does not "
                                      f"serve {', '.join(impl.refusals)} yet")
        self.index = index
        self.num_heads, self.num_kv_heads = layer.num_heads, layer.num_kv_heads
        self.head_size, self.head_size_v = layer.head_size, layer.head_size_v
        self.scale, self.sliding_window = impl.scale, impl.sliding_window
        self.soft_cap = impl.logits_soft_cap

    def __call__(self, query, key, value, output_shape=None, output_dtype=None):
        from xla_inference.torch_models.step import from_torch, to_torch

        step = _current.step
        q, k, v = from_torch((query, key, value))
        T = q.shape[0]
        q = q.reshape(T, self.num_heads, self.head_size)
        k = k.reshape(T, self.num_kv_heads, self.head_size)
        v = v.reshape(T, self.num_kv_heads, self.head_size_v)
        layer_cache, out = paged_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), step.kv_cache.layer(self.index),
            step.metadata, scale=self.scale, sliding_window=self.sliding_window,
            soft_cap=self.soft_cap)
        step.kv_cache = step.kv_cache.updated(self.index, layer_cache)
        out = out.reshape(T, self.num_heads * self.head_size_v)
        if output_dtype is not None:
            out = out.astype(from_torch(output_dtype))
        return to_torch(out)


class EncoderOnlyAttentionForward:
    """Replaces an encoder-only `Attention` module's forward (vLLM's EncoderOnlyAttention:
    BERT-style embedders): no KV cache; each token attends to every token of its own prompt,
    which vLLM schedules whole (layers/bidirectional_attention.py)."""

    def __init__(self, layer, max_len: int):
        impl = layer.impl
        if impl.refusals:
            raise NotImplementedError(f"{layer.layer_name}: xla-inference's torch path does not "
                                      f"serve {', '.join(impl.refusals)} yet")
        if impl.sliding_window is not None or impl.logits_soft_cap is not None:
            raise NotImplementedError(f"{layer.layer_name}: xla-inference's encoder-only "
                                      "attention has no sliding window or soft cap")
        self.num_heads, self.num_kv_heads = layer.num_heads, layer.num_kv_heads
        self.head_size, self.head_size_v = layer.head_size, layer.head_size_v
        self.scale, self.max_len = impl.scale, max_len

    def __call__(self, query, key, value, output_shape=None, output_dtype=None):
        from xla_inference.torch_models.step import from_torch, to_torch

        step = _current.step
        q, k, v = from_torch((query, key, value))
        T = q.shape[0]
        out = bidirectional_attention(
            q.reshape(T, self.num_heads, self.head_size),
            k.reshape(T, self.num_kv_heads, self.head_size).astype(q.dtype),
            v.reshape(T, self.num_kv_heads, self.head_size_v).astype(q.dtype),
            step.segments, scale=self.scale, max_len=self.max_len)
        out = out.reshape(T, self.num_heads * self.head_size_v)
        if output_dtype is not None:
            out = out.astype(from_torch(output_dtype))
        return to_torch(out)


def attention_layers(module: torch.nn.Module) -> list:
    """vLLM's Attention modules of a model, in module order (the KV cache layer order)."""
    from vllm.model_executor.layers.attention.attention import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


def install(module: torch.nn.Module, max_len: int = 0) -> list:
    """Point every Attention module of `module` at the paged cache, or, for an encoder-only
    layer, at the cache-free bidirectional attention (max_len: the longest prompt, vLLM's
    max_model_len); -> the forwards in module order. Only the paged ones are KV cache
    layers, numbered in that order."""
    forwards = []
    for layer in attention_layers(module):
        if getattr(layer.impl, "attn_type", None) == AttentionType.ENCODER_ONLY:
            forward = EncoderOnlyAttentionForward(layer, max_len)
        else:
            forward = PagedAttentionForward(len(paged(forwards)), layer)
        layer.forward = forward
        forwards.append(forward)
    return forwards


def paged(forwards: list) -> list[PagedAttentionForward]:
    """The forwards that keep a KV cache, in KV cache layer order."""
    return [f for f in forwards if isinstance(f, PagedAttentionForward)]
