"""Padding buckets: the fixed set of shapes XLA compiles, all of them before serving."""

import bisect


# Below 16 tokens only 1, 2 and 4: decode steps of one or a few requests are bound by
# reading the weights, and XLA's CPU backend reads them fastest for one row (a matrix-vector
# product; padding one row to 2 or 16 slowed a batch-1 step markedly: benchmarks/RESULTS.md,
# "Figures moved from code comments"). Every bucket adds a compile at start-up.
_SMALL_BUCKETS = (1, 2, 4)


def token_buckets(max_num_tokens: int, smallest: int = 16) -> list[int]:
    """1, 2 and 4, then powers of two from `smallest`, ending with exactly `max_num_tokens`."""
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
