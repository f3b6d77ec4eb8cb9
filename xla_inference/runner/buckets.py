"""Padding buckets: the fixed set of shapes XLA compiles, all of them before serving."""

import bisect


def token_buckets(max_num_tokens: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest`, ending with exactly `max_num_tokens`."""
    buckets, size = [], smallest
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
