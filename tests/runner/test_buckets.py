"""The padded shapes the engine compiles: every step size maps to the smallest bucket that
holds it, and the ladder ends at exactly the step budget."""

import pytest

from xla_inference.runner.buckets import pick_bucket, seqs_for_tokens, token_buckets


@pytest.mark.parametrize("budget, expected", [
    (2048, [1, 2, 4, 16, 32, 64, 128, 256, 512, 1024, 2048]),
    (256, [1, 2, 4, 16, 32, 64, 128, 256]),
    (100, [1, 2, 4, 16, 32, 64, 100]),
    (8, [1, 2, 4, 8]),
    (4, [1, 2, 4]),
    (1, [1]),
])
def test_token_buckets(budget, expected):
    assert token_buckets(budget) == expected


def test_pick_bucket_is_the_smallest_that_holds():
    buckets = token_buckets(2048)
    for n in range(1, 2049):
        b = pick_bucket(buckets, n)
        assert b >= n and all(x < n for x in buckets if x < b)
    with pytest.raises(ValueError):
        pick_bucket(buckets, 2049)


def test_rows_never_exceed_tokens_or_max_seqs():
    assert [seqs_for_tokens(t, 64) for t in (1, 2, 4, 16, 128)] == [1, 2, 4, 16, 64]
