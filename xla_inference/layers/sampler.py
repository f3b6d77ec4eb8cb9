"""Token sampling on device: greedy, temperature, top-k and top-p, per request in one batch."""

import jax
import jax.numpy as jnp

from xla_inference.runner.batch import SamplingBatch

_GREEDY_EPS = 1e-5


def sample(logits: jax.Array, params: SamplingBatch, key: jax.Array) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = params.temperature < _GREEDY_EPS
    return jax.lax.cond(
        jnp.all(is_greedy),
        lambda: greedy_tokens,
        lambda: jnp.where(is_greedy, greedy_tokens, _random_sample(logits, params, key)),
    )


def _random_sample(logits, params: SamplingBatch, key):
    temperature = jnp.where(params.temperature < _GREEDY_EPS, 1.0, params.temperature)
    scaled = logits / temperature[:, None]
    needs_truncation = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
    scaled = jax.lax.cond(needs_truncation, _truncate_top_k_top_p, lambda x, *_: x,
                          scaled, params.top_k, params.top_p)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
    gumbel = jax.random.gumbel(key, scaled.shape, jnp.float32)
    return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)


def _truncate_top_k_top_p(logits, top_k, top_p):
    """Mask (to -inf) tokens outside each row's top-k and its top-p nucleus."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    # Nucleus: keep a sorted token while the probability mass before it is below top_p.
    probs = jax.nn.softmax(jnp.where(sorted_desc >= kth_value, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    num_keep = jnp.maximum(keep_sorted.sum(axis=-1), 1)
    p_value = jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth_value, p_value)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
