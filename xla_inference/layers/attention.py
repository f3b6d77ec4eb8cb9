"""Attention over the paged KV cache (write this step's K/V, then ragged attention), and the
self-attention block around it: projections, optional q/k norms, rope."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from xla_inference.kernels.backend import PALLAS_TPU, attention_backend
from xla_inference.kernels.metadata import AttentionMetadata, LayerCache
from xla_inference.kernels.ragged_paged_attention import write_kv_and_attend
from xla_inference.layers.linear import linear_many, row_parallel_project
from xla_inference.layers.norms import rms_norm
from xla_inference.layers.rope import apply_mrope, apply_rope
from xla_inference.parallel.axes import weight
from xla_inference.parallel.sharding import (TENSOR_AXIS, refuse_nested_interpret_callbacks,
                                             splits, tensor_parallel_mesh)



def paged_attention(q, k, v, kv: LayerCache, md: AttentionMetadata, *, scale: float,
                    sliding_window: int | None = None,
                    soft_cap: float | None = None, attention_chunk: int | None = None,
                    k_scale=1.0, v_scale=1.0):
    """q [T, N, H], k/v [T, K, H] -> (updated layer cache, out [T, N, H]), through the block
    table of the layer's KV cache group.
    attention_chunk: keys only from the query's own chunk of that many positions (Llama 4).
    k_scale, v_scale: an fp8 cache stores k / k_scale and v / v_scale (floats or scalars;
    kernels/ragged_paged_attention.py); a cache of the activations' dtype ignores them.

    Under tensor parallel with the KV heads split (the cache sharded on them), each device
    writes and attends with its own KV heads and their query heads (_split_by_kv_heads)."""
    slot_mapping, block_tables = md.group(kv.group)
    attend = functools.partial(_write_and_attend, block_size=md.block_size, scale=scale,
                               sliding_window=sliding_window, soft_cap=soft_cap,
                               attention_chunk=attention_chunk)
    mesh = tensor_parallel_mesh()
    num_kv_heads = kv.arrays[0].shape[1]
    if mesh is not None and splits(mesh, "kv_heads", num_kv_heads, num_kv_heads):
        attend = _split_by_kv_heads(attend, mesh)
    k_cache, v_cache, out = attend(
        kv.arrays[0], kv.arrays[1], q, k, v, slot_mapping, md.seq_ids, md.positions,
        block_tables, jnp.asarray(k_scale, jnp.float32), jnp.asarray(v_scale, jnp.float32))
    return LayerCache((k_cache, v_cache), kv.group), out


def _write_and_attend(k_cache, v_cache, q, k, v, slot_mapping, seq_ids, positions,
                      block_tables, k_scale, v_scale, **attention):
    # One kernel call where the backend writes the rows itself (Pallas TPU), else
    # write_kv then attention (kernels/ragged_paged_attention.write_kv_and_attend).
    return write_kv_and_attend(q, k, v, slot_mapping, k_cache, v_cache, seq_ids, positions,
                               block_tables, k_scale=k_scale, v_scale=v_scale, **attention)


def _split_by_kv_heads(attend, mesh):
    """attend run on each device of the tensor-parallel axis with its share of the KV heads
    (caches, new K/V) and of the query heads (N = K * G heads, in K groups of G: a
    contiguous 1/n of the query heads is exactly the groups of a contiguous 1/n of the KV
    heads); token metadata and the scales whole everywhere. Attention never mixes heads, so
    nothing crosses devices. GSPMD cannot split the call itself: the native CPU kernel (an
    FFI custom call) and Pallas kernels have no partitioning rule, and without one XLA
    gathers the whole cache onto every device, every layer."""
    backend = attention_backend()
    if backend.name == PALLAS_TPU and backend.interpret:
        refuse_nested_interpret_callbacks(mesh, "the TPU attention kernel")
    heads = PartitionSpec(None, TENSOR_AXIS, None)  # [slots or T, heads, H]
    whole = PartitionSpec()
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(heads,) * 5 + (whole,) * 6, out_specs=(heads,) * 3,
        axis_names={TENSOR_AXIS}, check_vma=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SelfAttention:
    """Projections of one attention layer; the optional parts are None where a family has none."""

    # The checkpoint's [out, in] layout (layers/linear.py says why).
    wq: jax.Array = weight("heads", "embed", projection=True)  # [N*H, D]
    wk: jax.Array = weight("kv_heads", "embed", projection=True)  # [K*H, D]
    wv: jax.Array = weight("kv_heads", "embed", projection=True)  # [K*H, D]
    wo: jax.Array = weight("embed", "heads", projection=True)  # [D, N*H]
    bq: jax.Array | None = weight("heads", default=None)  # [N*H] (Qwen2's q/k/v biases)
    bk: jax.Array | None = weight("kv_heads", default=None)  # [K*H]
    bv: jax.Array | None = weight("kv_heads", default=None)  # [K*H]
    bo: jax.Array | None = None  # [D]
    q_norm: jax.Array | None = None  # [H] RMSNorm weight over each head, before rope (Qwen3)
    k_norm: jax.Array | None = None  # [H]
    # [] float32: a checkpoint's KV cache scales (vLLM's k_scale / v_scale), used by an fp8
    # KV cache only; None: 1.0, vLLM's default when the checkpoint has none.
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


def self_attention(p: SelfAttention, x, kv: LayerCache, md: AttentionMetadata,
                   inv_freq: jax.Array, *, head_dim: int, scale: float, norm_eps: float,
                   sliding_window: int | None = None, soft_cap: float | None = None,
                   qk_norm=rms_norm, mrope: tuple[jax.Array, tuple[int, ...]] | None = None,
                   mask_positions: jax.Array | None = None, residual: jax.Array | None = None):
    """x [T, D] (already normed, or a norms.DeferredRmsNorm the projections take) ->
    (updated layer cache, out [T, D]): project, rope, paged attention. With residual [T, D],
    out is residual + the attention's output (the sum made by the output projection's call
    where it can: layers/linear.row_parallel_project).

    qk_norm(x, weight, eps) normalizes q and k per head where the layer has q/k norms
    (Gemma passes its (1 + w) norm).
    mrope: (positions [3, T], section) for multimodal rope (layers/rope.apply_mrope) in place
    of rope by md.positions, which stay the tokens' places in their sequences for attention.
    mask_positions: [T] the position up to which each token attends (and from which its
    sliding window counts back) in place of its own: Gemma 3 lets an image's tokens see
    the whole image (models/gemma3_mm.py); rope still turns by md.positions.
    """
    T = x.shape[0]
    q, k, v = linear_many(x, (p.wq, p.wk, p.wv), (p.bq, p.bk, p.bv))
    q = q.reshape(T, -1, head_dim)  # [T, N, H]
    k = k.reshape(T, -1, head_dim)  # [T, K, H]
    v = v.reshape(T, -1, head_dim)
    if p.q_norm is not None:
        q = qk_norm(q, p.q_norm, norm_eps)
    if p.k_norm is not None:
        k = qk_norm(k, p.k_norm, norm_eps)
    if mrope is None:
        q = apply_rope(q, md.positions, inv_freq)
        k = apply_rope(k, md.positions, inv_freq)
    else:
        positions, section = mrope
        q = apply_mrope(q, positions, inv_freq, section)
        k = apply_mrope(k, positions, inv_freq, section)
    if mask_positions is not None:
        md = dataclasses.replace(md, positions=mask_positions)
    kv, out = paged_attention(q, k, v, kv, md, scale=scale, sliding_window=sliding_window,
                              soft_cap=soft_cap, k_scale=_or_one(p.k_scale),
                              v_scale=_or_one(p.v_scale))
    # [T, N*H] split by heads under TP: wo is row-parallel (a collective matmul there).
    return kv, row_parallel_project(out.reshape(T, -1), p.wo, p.bo, logical_axis="heads",
                                    units=out.shape[1], residual=residual)


def _or_one(kv_cache_scale):
    return 1.0 if kv_cache_scale is None else kv_cache_scale
