"""Padding buckets: the fixed set of shapes XLA compiles, all of them before serving."""

import bisect


# Below 16 tokens only 2 and 4: decode steps of one or a few requests are bound by reading
# the weights, and padding them to 16 rows made a batch-1 decode step of SmolLM2 take 2x
# longer; every bucket adds a compile at start-up. Not 1: with one token XLA's CPU backend
# turns the KV scatter into an update that copies each layer's whole cache (4 copies per
# layer, 10x slower).
_SMALL_BUCKETS = (2, 4)


def token_buckets(max_num_tokens: int, smallest: int = 16) -> list[int]:
    """2 and 4, then powers of two from `smallest`, ending with exactly `max_num_tokens`."""
    buckets = [b for b in _SMALL_BUCKETS if b < min(smallest, max_num_tokens)]
    size = smallest
    while size < max_num_tokens:
        buckets.append(size)
        size *= 2
    buckets.append(max_num_tokens)
    return buckets


def pick_bucket(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def seqs_for_tokens(num_tokens_bucket: int, max_num_seqs: int) -> int:
    """Request rows padded with a token bucket: a step never has more requests than tokens."""
    return min(num_tokens_bucket, max_num_seqs)
