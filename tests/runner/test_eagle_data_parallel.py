"""An EAGLE-3 head over two data parallel replicas (spec_decode/eagle.py, limits.replicas 2, a
(data 2, model 4) mesh of 8 virtual CPU devices): each replica's requests run on its own
data slice over its own share of the head's KV pages, so every device holds half the KV
bytes of a cache spanning both replicas' pages (what the head kept before); the drafts over
a prompt step and a verify step, requests of both replicas interleaved in the scheduler's
order, equal the one-replica proposer's over the same pages and a float64 reference's;
nothing compiles after warm-up."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.eagle3_checkpoint import HIDDEN, NumpyEagle3, save_tiny_eagle3
from tests.helpers import ENGINE_BLOCK
from xla_inference.models import eagle3
from xla_inference.parallel.sharding import build_mesh
from xla_inference.runner import compile_counter
from xla_inference.spec_decode.eagle import EagleLimits, EagleProposer
from xla_inference.runner.requests import RequestState

K = 3
AUX = (0, 1, 2)
WIDTH = HIDDEN * (1 + len(AUX))  # the target step's hidden columns: final, then the aux
PAGES = 40  # a replica's pages (its first is its null page)
MAX_TOKENS = 16  # a replica's largest bucket


def _proposer(cfg, params, replicas: int, mesh):
    """replicas 1: one cache over both replicas' pages (2 * PAGES), one step over both
    replicas' tokens and rows (as the head ran every replica before)."""
    # Two buckets (fewer programs to compile): the steps' tokens, the draft steps' rows.
    limits = EagleLimits(token_buckets=(4 * (2 // replicas), MAX_TOKENS * (2 // replicas)),
                         max_num_seqs=4 * (2 // replicas),
                         max_model_len=64, block_size=ENGINE_BLOCK,
                         num_slots=PAGES * (2 // replicas) * ENGINE_BLOCK, groups=(0,),
                         num_speculative_tokens=K, replicas=replicas)
    return EagleProposer(eagle3, params, cfg, limits, mesh, jnp.float32)


def _device_kv_bytes(proposer) -> int:
    """The head's KV bytes on the first device."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for arrays in proposer.kv.arrays for a in arrays
               for shard in a.addressable_shards if shard.device == device)


def _requests(rng):
    """Two requests on each replica's pages (replica 1's from page PAGES on), in the
    scheduler's order alternating replicas."""
    firsts = (1, PAGES + 1, 17, PAGES + 17)
    return [RequestState(f"r{i}", rng.integers(3, 128, n).tolist(), n,
                         [list(range(first, first + 16))], 0)
            for i, (n, first) in enumerate(zip((3, 6, 9, 5), firsts))]


class Target:
    """A fixed random aux state per (request, position); other rows random."""

    def __init__(self, seed=1):
        self.rng = np.random.default_rng(seed)
        self.aux = {}

    def true_aux(self, rid, position):
        key = (rid, position)
        if key not in self.aux:
            self.aux[key] = self.rng.standard_normal(len(AUX) * HIDDEN).astype(np.float32)
        return self.aux[key]

    def step_hidden(self, scheduled, kept, T):
        hidden = self.rng.standard_normal((T, WIDTH)).astype(np.float32)
        row = 0
        for (req, n), keep in zip(scheduled, kept):
            for j in range(keep):
                hidden[row + j, HIDDEN:] = self.true_aux(req.req_id, req.num_computed_tokens + j)
            row += n
        return jax.device_put(hidden)  # replicated, as the target's step returns it


def _run_two_steps(proposer, target: "Target", hidden_rows: int):
    """A prompt step (the last prompt in two chunks: its first chunk drafts nothing), then a
    verify step (one draft accepted; none; all; the last prompt's end). hidden_rows: the
    target step's hidden rows (one replica: its bucket over every token; two: 2 x a
    replica's bucket). -> (each step's drafts, the requests)."""
    reqs = _requests(np.random.default_rng(5))
    chunks = (3, 6, 9, 3)
    scheduled = list(zip(reqs, chunks))
    proposer.saw_target_step(scheduled, target.step_hidden(scheduled, chunks, hidden_rows))
    sampled = []
    for (req, n), tail in zip(scheduled, (21, 22, 23, 24)):
        req.num_computed_tokens += n
        done = req.num_computed_tokens == len(req.token_ids)
        if done:
            req.token_ids.append(tail)
        sampled.append([tail] if done else [])
    first = proposer.propose(reqs, sampled)

    scheduled = [(r, 1 + K) for r in reqs[:3]] + [(reqs[3], 2)]
    kept = [2, 1, 1 + K, 2]
    proposer.saw_target_step(scheduled, target.step_hidden(scheduled, kept, hidden_rows))
    emitted = [first[0][:1] + [7], [9], first[2] + [11], None]
    for (req, n), out in zip(scheduled, emitted):
        req.num_computed_tokens += n if out is None else len(out)
        req.token_ids.extend([13] if out is None else out)
    return (first, proposer.propose(reqs, [[1]] * 4)), reqs


def test_two_replicas_draft_as_one_with_half_the_kv_per_device(tmp_path):
    import json

    from xla_inference.loading.safetensors import CheckpointTensors, safetensors_files

    path = save_tiny_eagle3(tmp_path / "head", AUX)
    cfg = eagle3.Eagle3Config.from_hf(json.loads((path / "config.json").read_text()), 2)
    params = eagle3.load_params(CheckpointTensors(safetensors_files(path)), cfg, jnp.float32)
    one = _proposer(cfg, params, 1, build_mesh())
    two = _proposer(cfg, params, 2, build_mesh(tensor_parallel_size=4, data_parallel_size=2))
    assert len(jax.devices()) == 8 and two.mesh.shape == {"data": 2, "model": 4}
    # Before: one cache over both replicas' pages on every device; now each its replica's.
    assert _device_kv_bytes(two) * 2 == _device_kv_bytes(one) > 0
    target = Target()
    expected, _ = _run_two_steps(one, target, 2 * MAX_TOKENS)

    two.warm_up(jnp.float32)
    compile_counter.install()
    before = compile_counter.num_compilations()
    got, reqs = _run_two_steps(two, target, 2 * MAX_TOKENS)
    assert compile_counter.num_compilations() == before
    assert got == expected
    assert got[0][3] == [] and all(len(d) == K for d in got[0][:3] + got[1])
    ref = NumpyEagle3(path, None)
    for req, drafts in zip(reqs, got[1]):
        aux = np.stack([target.true_aux(req.req_id, p) for p in range(len(req.token_ids) - 1)])
        assert drafts == ref.propose(req.token_ids, aux.astype(np.float64), K)
    assert two.forward_steps == one.forward_steps
