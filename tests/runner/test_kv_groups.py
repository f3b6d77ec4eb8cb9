"""KV cache groups in the engine (no vLLM): a tiny Gemma 3 (sliding, global, sliding; window
8) whose layers read three block tables over one shared set of cache arrays, as vLLM's
hybrid KV cache lays them out, with the sliding groups' pages freed as the window moves on
and handed straight to other groups and requests. Logits must equal transformers' at every
position computed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import ENGINE_BLOCK, hf_logits, save_tiny_gemma3
from xla_inference.runner.build import Precision, build_engine, load
from xla_inference.runner.engine import EngineConfig
from xla_inference.runner.requests import RequestState, build_step_batch

WINDOW = 8
NUM_BLOCKS = 64
# vLLM's groups for the tiny model: the global layer's, then one per sliding layer; all
# three layers at the same bytes (one layer of each group per page).
LAYER_GROUPS = (1, 0, 2)
SLIDING_GROUPS = (1, 2)


class Pages:
    """A page pool as vLLM's block pool hands pages out: the most recently freed first, so
    a page a sliding window left is soon another group's or request's."""

    def __init__(self, first: int = 0):
        """A replica's pool: pages first.. first + NUM_BLOCKS - 1, the first its null page."""
        self.null = first
        self.free = list(range(first + NUM_BLOCKS - 1, first, -1))

    def take(self) -> int:
        return self.free.pop()

    def give(self, page: int) -> None:
        self.free.append(page)


def _schedule(req: RequestState, num_new: int, pages: Pages, freed_upto: list[int],
              null_freed: bool) -> int:
    """vLLM's allocation before a step: free each sliding group's pages wholly before the
    window of the first new token (null_freed: replace them by the null page, as vLLM sends
    a new or resumed request; else keep the stale ids, as a running request's table keeps
    them), then give every group pages for the new tokens. freed_upto: per group, how many
    of the request's first pages are freed already. Returns pages freed."""
    freed = 0
    first_key = max(0, req.num_computed_tokens - WINDOW + 1)
    for g in SLIDING_GROUPS:
        ids = req.block_ids[g]
        for i in range(freed_upto[g], min(first_key // ENGINE_BLOCK, len(ids))):
            pages.give(ids[i])
            freed += 1
            if null_freed:
                ids[i] = pages.null
            freed_upto[g] = i + 1
    needed = -(-(req.num_computed_tokens + num_new) // ENGINE_BLOCK)
    for ids in req.block_ids:
        while len(ids) < needed:
            ids.append(pages.take())
    return freed


@pytest.mark.parametrize("null_freed,replicas", [(True, 1), (False, 1), (True, 2)],
                         ids=["null", "stale", "null-data-parallel"])
def test_groups_over_shared_arrays_match_transformers(tmp_path, null_freed, replicas):
    """replicas 2: data parallel, requests alternating between the replicas, each replica's
    page ids (its null page included) offset by its first page, as plugin/dp_scheduler.py
    hands them over."""
    model_dir = save_tiny_gemma3(tmp_path / "gemma3")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (30, 19, 26)]
    expected = [hf_logits(model_dir, p) for p in prompts]
    f32 = jnp.dtype(jnp.float32)
    model = load(model_dir, Precision.uniform(f32))
    ecfg = EngineConfig(num_blocks=replicas * NUM_BLOCKS, block_size=ENGINE_BLOCK,
                        max_num_tokens=32, max_num_seqs=4, max_model_len=64,
                        layer_groups=LAYER_GROUPS, layer_arrays=(0, 0, 0))
    engine = build_engine(model, ecfg, data_parallel_size=replicas)
    assert len(engine.kv_cache.arrays) == 1 and engine.cfg.num_groups == 3
    assert engine.replicas == replicas and engine.blocks_per_replica == NUM_BLOCKS
    # Whatever a null page holds must never reach a real token.
    engine.kv_cache = jax.tree.map(_poison_null_page, engine.kv_cache)
    pools = [Pages(r * NUM_BLOCKS) for r in range(replicas)]
    reqs = [RequestState(f"r{i}", p, len(p), [[], [], []], 0) for i, p in enumerate(prompts)]
    freed_upto = {req.req_id: [0, 0, 0] for req in reqs}
    # Chunked prefills (one reaching back past the window) beside decodes of later tokens.
    plan = [{0: 12, 1: 7}, {0: 10, 1: 6, 2: 9}, {0: 8, 1: 6, 2: 1}, {2: 1}, {2: 15}]
    freed = checked = 0
    for step in plan:
        scheduled = [(reqs[i], n) for i, n in step.items()]
        freed += sum(_schedule(req, n, pools[int(req.req_id[1:]) % replicas],
                               freed_upto[req.req_id], null_freed) for req, n in scheduled)
        logits = np.asarray(engine.forward(scheduled).logits)
        for row, (req, n) in enumerate(scheduled):
            req.num_computed_tokens += n
            pos = req.num_computed_tokens - 1
            np.testing.assert_allclose(logits[row], expected[int(req.req_id[1:])][pos],
                                       rtol=2e-4, atol=2e-4)
            checked += 1
    assert freed >= 6 and checked == 10
    assert all(req.num_computed_tokens == len(req.token_ids) for req in reqs)
    if null_freed:
        for pool in pools:
            assert any(pool.null in req.block_ids[g] for req in reqs for g in SLIDING_GROUPS)
    if replicas > 1:
        assert engine.rows_per_replica.tolist() == [7, 3]  # r0 and r2, r1: both replicas ran


def _poison_null_page(cache: jax.Array) -> jax.Array:
    """NaN in the null page (every replica's), the cache keeping its sharding."""
    def poison(a):
        return a.at[..., :ENGINE_BLOCK, :, :].set(jnp.nan)

    return jax.jit(poison, out_shardings=cache.sharding)(cache)


def test_step_batch_has_a_block_table_per_group():
    req = RequestState("r", list(range(10)), 10, [[5, 6, 7], [0, 3, 9]], 4)
    layout = EngineConfig(num_blocks=16, block_size=4, max_num_tokens=8, max_num_seqs=2,
                          max_model_len=16, layer_groups=(0, 1), layer_arrays=(0, 0))
    from xla_inference.runner.requests import BatchLayout

    batch = build_step_batch([(req, 5)], BatchLayout(8, 2, layout.max_blocks_per_seq, 4, 2))
    md = batch.attention
    assert md.block_tables.shape == (2, 2, 4) and md.slot_mapping.shape == (2, 8)
    np.testing.assert_array_equal(md.block_tables[:, 0, :3], [[5, 6, 7], [0, 3, 9]])
    # positions 4..8: pages 1 and 2 of each group's list
    np.testing.assert_array_equal(md.slot_mapping[:, :5],
                                  [[24, 25, 26, 27, 28], [12, 13, 14, 15, 36]])
    np.testing.assert_array_equal(md.slot_mapping[:, 5:], 0)  # padding: the null page
    with pytest.raises(ValueError, match="1 KV cache groups; the engine has 2"):
        build_step_batch([(RequestState("s", [1], 1, [[1]], 0), 1)],
                         BatchLayout(8, 2, 4, 4, 2))


def test_layers_sharing_arrays_must_agree_on_their_shape(tmp_path):
    from tests.helpers import save_tiny_family

    model = load(save_tiny_family(tmp_path / "q", "qwen3"), Precision.uniform(jnp.float32))
    ok = EngineConfig(num_blocks=8, block_size=4, max_num_tokens=8, max_num_seqs=2,
                      max_model_len=16, layer_groups=(0, 1), layer_arrays=(0, 2))
    with pytest.raises(ValueError, match="numbered 0"):
        build_engine(model, ok, keep_host_params=True)
    wrong = EngineConfig(num_blocks=8, block_size=4, max_num_tokens=8, max_num_seqs=2,
                         max_model_len=16, layer_groups=(0, 1, 2), layer_arrays=(0, 0, 0))
    with pytest.raises(ValueError, match="KV layout for 3 layers; the model has 2"):
        build_engine(model, wrong, keep_host_params=True)
