"""Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi-K2), in its absorbed form.

Each token's keys and values are compressed into one latent vector c [L] (kv_a_proj, then
an RMSNorm) plus one rope key k_rope [R] shared by every head. The checkpoint expands the
latent per head with kv_b_proj into a key part k_nope [N, P] = W_uk c and a value
v [N, H] = W_uv c; the query has a nope part q_nope [N, P] and a rope part q_rope [N, R].

The paged cache holds only [c, k_rope] per token (L + R values, 576 for DeepSeek-V3
against 128 heads x (192 + 128) expanded), and attention runs on it directly:
    q_nope . k_nope = (W_uk^T q_nope) . c        (W_uk absorbed into the query)
    sum_s p_s v_s  = W_uv (sum_s p_s c_s)        (W_uv applied after attention)
so each head's query is [W_uk^T q_nope, q_rope] [L + R] against the keys [c, k_rope], with
the latent itself as the value: multi-query attention with one kv head, whose keys are
their own values. Why absorbed rather than expanding the cached latents inside the step:
expanding costs a kv_b_proj matmul over every cached token of every sequence, every
layer, every step (and a kernel that gathers pages before expanding), while absorbing
costs two small per-head matmuls over this step's tokens only, and the ragged paged
kernel runs unchanged in shape. In exact arithmetic the two are equal; in float32 they
differ by the order of summation only.

The engine holds one cache array per layer, [num_slots, 1, L + R], and the kernel's
shared_kv mode reads each row as both key and value (KvLayer kind MLA in the model).
Under tensor parallel the query heads split over the model axis and the cache, one head,
stays whole on every device: each device attends with its own heads only
(latent_paged_attention), and w_uv and wo, split by heads, follow.

Letters: T tokens, D model dim, N heads, Q q_lora_rank, L kv_lora_rank, R rope dims, P
nope dims, H value head dim.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention, write_cache
from xla_inference.layers.norms import rms_norm
from xla_inference.layers.rope import apply_rope
from xla_inference.parallel.axes import weight
from xla_inference.parallel.sharding import TENSOR_AXIS, splits, tensor_parallel_mesh
from xla_inference.kernels.metadata import AttentionMetadata, LayerCache

# transformers' (and DeepSeek's own) q_a_layernorm and kv_a_layernorm keep RMSNorm's
# default epsilon whatever the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MlaAttention:
    wq_a: jax.Array | None  # [D, Q] (None: the query comes straight from x, q_lora_rank null)
    q_a_norm: jax.Array | None  # [Q]
    # The per-head projections split by heads; the latent ones (wq_a, wkv_a) and the latent
    # cache stay whole on every device.
    wq_nope: jax.Array = weight(None, "heads", None)  # [Q or D, N, P]
    wq_rope: jax.Array = weight(None, "heads", None)  # [Q or D, N, R], rotate-half order
    wkv_a: jax.Array = weight()  # [D, L + R]: the latent, then the rope key (rotate-half order)
    kv_a_norm: jax.Array = weight()  # [L]
    w_uk: jax.Array = weight("heads", None, None)  # [N, P, L] kv_b_proj's key rows per head
    w_uv: jax.Array = weight("heads", None, None)  # [N, L, H] its value rows, transposed
    wo: jax.Array = weight("heads", None, "embed")  # [N, H, D]
    # [] float32: the checkpoint's scale of the latent cache (vLLM's k_scale), used by an
    # fp8 KV cache only; None: 1.0.
    k_scale: jax.Array | None = None


def cache_width(kv_lora_rank: int, rope_dim: int) -> int:
    """Values per token in a layer's cache: the latent and the rope key."""
    return kv_lora_rank + rope_dim


def _queries(p: MlaAttention, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, D] -> (q_nope [T, N, P], q_rope [T, N, R]) before rope."""
    h = x if p.wq_a is None else rms_norm(x @ p.wq_a, p.q_a_norm, LATENT_NORM_EPS)
    return (jnp.einsum("TQ,QNP->TNP", h, p.wq_nope), jnp.einsum("TQ,QNR->TNR", h, p.wq_rope))


def _rope(x: jax.Array, positions, inv_freq, rope_scale: float) -> jax.Array:
    out = apply_rope(x, positions, inv_freq)
    return out if rope_scale == 1.0 else out * jnp.asarray(rope_scale, out.dtype)


def mla_attention(p: MlaAttention, x: jax.Array, kv: LayerCache,
                  md: AttentionMetadata, inv_freq: jax.Array, *, scale: float,
                  rope_scale: float = 1.0):
    """x [T, D] (already normed) -> (updated layer cache, out [T, D]).

    scale: the softmax scale (of the full P + R head dim, with YaRN's mscale correction);
    rope_scale: YaRN's factor on the rotated q and k (cos and sin).
    """
    L = p.kv_a_norm.shape[0]
    q_nope, q_rope = _queries(p, x)
    latent_and_rope = x @ p.wkv_a  # [T, L + R]
    latent = rms_norm(latent_and_rope[:, :L], p.kv_a_norm, LATENT_NORM_EPS)  # [T, L]
    k_rope = _rope(latent_and_rope[:, None, L:], md.positions, inv_freq, rope_scale)
    q_rope = _rope(q_rope, md.positions, inv_freq, rope_scale)
    q_latent = jnp.einsum("TNP,NPL->TNL", q_nope, p.w_uk)
    query = jnp.concatenate([q_latent, q_rope], axis=-1)  # [T, N, L + R]
    key = jnp.concatenate([latent[:, None], k_rope], axis=-1)  # [T, 1, L + R]
    kv, out = latent_paged_attention(query, key, kv, md, scale=scale,
                                     k_scale=1.0 if p.k_scale is None else p.k_scale)
    values = jnp.einsum("TNL,NLH->TNH", out[..., :L], p.w_uv)
    return kv, jnp.einsum("TNH,NHD->TD", values, p.wo)


def latent_paged_attention(q: jax.Array, key: jax.Array, kv: LayerCache,
                           md: AttentionMetadata, *, scale: float, k_scale=1.0):
    """q [T, N, L + R], key [T, 1, L + R] (its own value) -> (updated layer cache,
    out [T, N, L + R]).

    kv: the layer's one cache array [num_slots, 1, L + R], and its KV cache group; an fp8
    cache stores key / k_scale (vLLM's one scale for MLA's latent cache).

    Under tensor parallel with the query heads split, each device writes its (whole) copy
    of the latent cache and attends with its own query heads only (_split_by_query_heads)."""
    slot_mapping, block_tables = md.group(kv.group)
    attend = functools.partial(_write_and_attend, block_size=md.block_size, scale=scale)
    mesh = tensor_parallel_mesh()
    num_heads = q.shape[1]
    if mesh is not None and splits(mesh, "heads", num_heads, num_heads):
        attend = _split_by_query_heads(attend, mesh)
    cache, out = attend(kv.arrays[0], q, key, slot_mapping, md.seq_ids, md.positions,
                        block_tables, jnp.asarray(k_scale, jnp.float32))
    return LayerCache((cache,), kv.group), out


def _write_and_attend(cache, q, key, slot_mapping, seq_ids, positions, block_tables, k_scale,
                      *, block_size: int, scale: float):
    cache = write_cache(cache, key, slot_mapping, k_scale)
    out = ragged_paged_attention(q, cache, None, seq_ids, positions, block_tables,
                                 block_size=block_size, scale=scale, shared_kv=True,
                                 k_scale=k_scale)
    return cache, out


def _split_by_query_heads(attend, mesh):
    """attend run on each device of the tensor-parallel axis with its share of the query
    heads, the latent cache, the new latent row and the token metadata whole everywhere.

    The latent is one KV head shared by every query head, so it cannot be split: each
    device keeps a whole copy of the cache (as the rules table places it) and writes the
    same rows into it, which keeps the copies equal without any collective. Left to GSPMD,
    the native CPU kernel (an FFI custom call with no partitioning rule) would have its
    head-split q gathered and run all N heads on every device; split here, each device
    computes N / tp heads and its output stays split by heads, as w_uv and the row-split
    wo after it expect."""
    heads = PartitionSpec(None, TENSOR_AXIS, None)  # q and out [T, N, L + R]
    whole = PartitionSpec()
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(whole, heads) + (whole,) * 6, out_specs=(whole, heads),
        axis_names={TENSOR_AXIS}, check_vma=False)
