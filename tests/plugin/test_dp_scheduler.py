"""DataParallelScheduler: N vLLM schedulers behind one, their batches merged into one step
with replica r's KV block ids shifted by r * blocks_per_replica. No model: the runner is faked."""

import copy
import dataclasses
import json
from collections import defaultdict, deque

import numpy as np
import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import GrammarOutput
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                        SlidingWindowSpec)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from xla_inference.plugin.dp_scheduler import DataParallelScheduler

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # vLLM's scheduler, imported above

BLOCK_SIZE = 4
NUM_BLOCKS = 41  # 2 replicas: 20 blocks each, the last block unused
SAMPLED = 7
PROMPTS = {"a": list(range(10, 20)), "b": list(range(30, 36)), "c": list(range(40, 53)), "d": [9, 8, 7, 6, 5]}
MAX_TOKENS = {"a": 3, "b": 5, "c": 2, "d": 4}


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    """A VllmConfig for a 2-layer llama (config.json only: nothing is loaded)."""
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    (model_dir / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, torch_dtype="float32", bos_token_id=1, eos_token_id=2)))
    config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True, max_model_len=64,
                                 dtype="float32"),
        # A 16-token budget splits the longer prompts into chunks.
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64,
                                         is_encoder_decoder=False, enable_chunked_prefill=True,
                                         async_scheduling=False),
        cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True))
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return config


def make_config(base_config, dp: int | None, async_scheduling: bool = False) -> VllmConfig:
    config = copy.copy(base_config)
    config.scheduler_config = copy.copy(base_config.scheduler_config)
    config.scheduler_config.async_scheduling = async_scheduling
    config.additional_config = {} if dp is None else {"xla_data_parallel_size": dp}
    return config


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float32)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(["layers.0", "layers.1"], spec)])


def make_scheduler(config, cls=DataParallelScheduler):
    return cls(vllm_config=config, kv_cache_config=kv_cache_config(),
               structured_output_manager=StructuredOutputManager(config), block_size=BLOCK_SIZE,
               hash_block_size=BLOCK_SIZE, include_finished_set=False, log_stats=True)


def make_request(req_id: str, prompt: list[int] | None = None) -> Request:
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return Request(req_id, prompt or PROMPTS[req_id],
                   SamplingParams(max_tokens=MAX_TOKENS.get(req_id, 2), ignore_eos=True),
                   pooling_params=None, block_hasher=get_request_block_hasher(BLOCK_SIZE, hash_fn))


def fake_runner_output(scheduler, so) -> ModelRunnerOutput:
    """One token per scheduled request whose prompt is done (read right after schedule())."""
    req_ids = list(so.num_scheduled_tokens)
    requests = scheduler.requests if isinstance(scheduler, Scheduler) else {
        rid: req for r in scheduler.replicas for rid, req in r.requests.items()}
    sampled = [[] if requests[rid].is_prefill_chunk else [SAMPLED] for rid in req_ids]
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                             sampled_token_ids=sampled)


def block_ids_of(so) -> dict[str, list[int]]:
    """Every KV block id a step hands out, per request."""
    ids = defaultdict(list)
    for new in so.scheduled_new_reqs:
        ids[new.req_id] += [b for group in new.block_ids for b in group]
    cached = so.scheduled_cached_reqs
    for rid, new_blocks in zip(cached.req_ids, cached.new_block_ids):
        ids[rid] += [b for group in new_blocks or () for b in group]
    return ids


def assert_in_replica_range(sched, so, replica_of):
    bpr = sched.blocks_per_replica
    for rid, blocks in block_ids_of(so).items():
        r = replica_of[rid]
        assert all(r * bpr <= b < (r + 1) * bpr for b in blocks), (rid, r, blocks)


def test_routing_block_ids_and_completion(base_config):
    sched = make_scheduler(make_config(base_config, 2))
    assert sched.blocks_per_replica == 20 and len(sched.replicas) == 2
    assert sched.kv_cache_config.num_blocks == NUM_BLOCKS
    assert [r.kv_cache_config.num_blocks for r in sched.replicas] == [20, 20]
    assert sched.connector is None and sched.ec_connector is None
    assert sched.kv_cache_manager is sched.replicas[0].kv_cache_manager
    for rid in PROMPTS:
        sched.add_request(make_request(rid))
    assert sched.replica_of == {"a": 0, "b": 1, "c": 0, "d": 1}
    assert set(sched.replicas[1].requests) == {"b", "d"}
    replica_of = dict(sched.replica_of)
    assert sched.get_request_counts() == (0, 4) and sched.get_num_unfinished_requests() == 4

    tokens, finish = defaultdict(list), {}
    saw_replica_1_blocks = False
    for _ in range(30):
        if not sched.has_requests():
            break
        so = sched.schedule()
        parts = sched._parts[id(so)][1]
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values()) == sum(
            p.total_num_scheduled_tokens for p in parts)
        assert list(so.num_scheduled_tokens) == [rid for p in parts for rid in p.num_scheduled_tokens]
        assert so.num_common_prefix_blocks == [0]
        assert_in_replica_range(sched, so, replica_of)
        # The replicas' own outputs keep their local ids.
        assert all(b < sched.blocks_per_replica for p in parts for bs in block_ids_of(p).values() for b in bs)
        saw_replica_1_blocks |= any(replica_of[rid] == 1 and blocks
                                    for rid, blocks in block_ids_of(so).items())
        outputs = sched.update_from_output(so, fake_runner_output(sched, so))
        stats = [eco.scheduler_stats for eco in outputs.values() if eco.scheduler_stats is not None]
        assert len(stats) == 1
        assert (stats[0].num_running_reqs, stats[0].num_waiting_reqs) == sched.get_request_counts()
        for eco in outputs.values():
            for out in eco.outputs:
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    finish[out.request_id] = out.finish_reason
    assert saw_replica_1_blocks and not sched._parts
    assert {rid: len(t) for rid, t in tokens.items()} == MAX_TOKENS
    assert all(t == [SAMPLED] * len(t) for t in tokens.values())
    assert set(finish) == set(PROMPTS)
    assert sched.replica_of == {} and not sched.has_requests()
    assert sched.get_kv_cache_usage() == 0.0
    assert sched.make_stats().num_running_reqs == 0


def test_abort_reaches_the_right_replica(base_config):
    sched = make_scheduler(make_config(base_config, 2))
    for rid in "abc":
        sched.add_request(make_request(rid))
    so = sched.schedule()
    sched.update_from_output(so, fake_runner_output(sched, so))

    aborted = sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in aborted] == ["b"]
    assert "b" not in sched.replicas[1].requests and "b" not in sched.replica_of
    assert set(sched.replicas[0].requests) == {"a", "c"}
    # Unknown and already finished ids are ignored; the next step tells the runner.
    assert sched.finish_requests(["b", "zzz"], RequestStatus.FINISHED_ABORTED) == []
    assert "b" in sched.schedule().finished_req_ids

    # A new request goes to the now empty replica 1.
    sched.add_request(make_request("d"))
    assert sched.replica_of["d"] == 1
    aborted = sched.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in aborted} == {"a", "c", "d"}
    assert sched.replica_of == {} and sched.get_num_unfinished_requests() == 0


def test_single_replica_matches_a_plain_scheduler(base_config):
    config = make_config(base_config, None)  # missing size: one replica
    dp, plain = make_scheduler(config), make_scheduler(config, cls=Scheduler)
    assert dp.blocks_per_replica == NUM_BLOCKS
    for rid in PROMPTS:
        dp.add_request(make_request(rid))
        plain.add_request(make_request(rid))
    for _ in range(30):
        if not plain.has_requests():
            break
        so_dp, so_plain = dp.schedule(), plain.schedule()
        assert dataclasses.replace(so_dp, num_common_prefix_blocks=[]) == so_plain
        out_dp = dp.update_from_output(so_dp, fake_runner_output(dp, so_dp))
        out_plain = plain.update_from_output(so_plain, fake_runner_output(plain, so_plain))
        assert out_dp.keys() == out_plain.keys()
        for c in out_plain:
            assert ([(o.request_id, o.new_token_ids, o.finish_reason) for o in out_dp[c].outputs]
                    == [(o.request_id, o.new_token_ids, o.finish_reason) for o in out_plain[c].outputs])
    assert not plain.has_requests() and not dp.has_requests()


def test_async_scheduling_schedules_ahead(base_config):
    """The engine schedules step k+1 before it updates step k."""
    sched = make_scheduler(make_config(base_config, 2, async_scheduling=True))
    assert all(type(r).__name__ == "AsyncScheduler" for r in sched.replicas)
    for rid in PROMPTS:
        sched.add_request(make_request(rid))
    replica_of = dict(sched.replica_of)
    in_flight, tokens = deque(), defaultdict(list)
    for _ in range(40):
        if sched.has_requests():
            so = sched.schedule()
            assert_in_replica_range(sched, so, replica_of)
            in_flight.append((so, fake_runner_output(sched, so)))
        if len(in_flight) == 2 or (in_flight and not sched.has_requests()):
            outputs = sched.update_from_output(*in_flight.popleft())
            for eco in outputs.values():
                for out in eco.outputs:
                    tokens[out.request_id] += out.new_token_ids
        if not in_flight and not sched.has_requests():
            break
    assert {rid: len(t) for rid, t in tokens.items()} == MAX_TOKENS
    assert sched.replica_of == {} and not sched._parts


def test_grammar_bitmask_rows_are_copied_per_replica(base_config):
    """The shared StructuredOutputManager hands out views of one buffer: each replica's rows
    must be copied before the next replica refills it."""
    sched = make_scheduler(make_config(base_config, 2))
    for rid in "ab":
        sched.add_request(make_request(rid))
    so = sched.schedule()
    assert sched.get_grammar_bitmask(so) is None
    buffer = np.zeros((4, 3), np.int32)

    def fake_bitmask(rid, value):
        def get(part):
            assert rid in part.num_scheduled_tokens
            buffer[:] = value
            return GrammarOutput([rid], buffer[:1], [0])
        return get

    sched.replicas[0].get_grammar_bitmask = fake_bitmask("a", 1)
    sched.replicas[1].get_grammar_bitmask = fake_bitmask("b", 2)
    out = sched.get_grammar_bitmask(so)
    assert out.structured_output_request_ids == ["a", "b"] and out.num_acceptable_drafts == [0, 0]
    np.testing.assert_array_equal(out.grammar_bitmask, [[1, 1, 1], [2, 2, 2]])


def test_each_replica_has_its_own_prefix_cache(base_config):
    sched = make_scheduler(make_config(base_config, 2))
    prompt = list(range(60, 72))  # 3 full blocks
    sched.add_request(make_request("p0", prompt))
    sched.add_request(make_request("q1", list(range(80, 92))))

    def run_to_end():
        while sched.has_requests():
            so = sched.schedule()
            sched.update_from_output(so, fake_runner_output(sched, so))

    run_to_end()
    sched.make_stats()  # drain the first round's prefix-cache counters
    # Both replicas are idle again: the first new request goes to replica 0, which has the
    # prompt cached; the second goes to replica 1, which has not.
    sched.add_request(make_request("p1", prompt))
    sched.add_request(make_request("p2", prompt))
    assert sched.replica_of == {"p1": 0, "p2": 1}
    so = sched.schedule()
    computed = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
    assert computed["p1"] > 0 and computed["p2"] == 0
    stats = sched.make_stats().prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 2 * len(prompt), computed["p1"])
    sched.update_from_output(so, fake_runner_output(sched, so))
    run_to_end()


def test_the_platform_folds_data_parallel_into_one_engine(base_config):
    """--data-parallel-size 2: vLLM is told 1 (one engine core), the replicas are ours."""
    from vllm.config import ParallelConfig

    model = base_config.model_config
    config = VllmConfig(model_config=model, parallel_config=ParallelConfig(data_parallel_size=2))
    assert config.parallel_config.data_parallel_size == 1
    assert config.additional_config["xla_data_parallel_size"] == 2
    assert config.scheduler_config.get_scheduler_cls() is DataParallelScheduler
    # LLM's route (vLLM's LLM class refuses the flag): additional_config.
    config = VllmConfig(model_config=model, additional_config={"data_parallel_size": 3})
    assert config.additional_config["xla_data_parallel_size"] == 3
    assert config.scheduler_config.get_scheduler_cls() is DataParallelScheduler
    assert VllmConfig(model_config=model).scheduler_config.scheduler_cls is None
    with pytest.raises(ValueError, match="external or hybrid load balancing"):
        VllmConfig(model_config=model, parallel_config=ParallelConfig(
            data_parallel_size=2, data_parallel_external_lb=True))


def test_a_replica_too_small_for_max_model_len_is_a_clear_error(base_config):
    # 41 blocks over 3 replicas: 13 each, 12 usable, 48 tokens < max_model_len 64.
    with pytest.raises(ValueError, match=r"holds 12 blocks per replica \(48 tokens\), fewer "
                       "than the 16 one request of max_model_len=64 takes"):
        make_scheduler(make_config(base_config, 3))


def test_hybrid_kv_cache_groups_shift_alike_null_blocks_included(base_config):
    """Two KV cache groups (full attention, a sliding window of 8): every group's block ids
    land in their replica's range; a prefix-cache hit past the window hands a new request
    its replica's null block (r * blocks_per_replica) for the pages the window left."""
    shape = dict(block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=61, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layers.0"], FullAttentionSpec(**shape)),
        KVCacheGroupSpec(["layers.1"], SlidingWindowSpec(**shape, sliding_window=8))])
    config = make_config(base_config, 2)
    sched = DataParallelScheduler(
        vllm_config=config, kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config), block_size=BLOCK_SIZE,
        hash_block_size=BLOCK_SIZE, include_finished_set=False, log_stats=True)
    bpr = sched.blocks_per_replica
    assert bpr == 30
    long_prompt = list(range(3, 33))  # 30 tokens: well past the window
    nulls = defaultdict(int)
    for rids in (("a", "b"), ("a2", "b2")):  # the second pair hits the first pair's pages
        for rid in rids:
            sched.add_request(make_request(rid, long_prompt + ([5] if rid.endswith("2") else [])))
        replica_of = dict(sched.replica_of)
        while sched.has_requests():
            so = sched.schedule()
            assert so.num_common_prefix_blocks == [0, 0]
            assert_in_replica_range(sched, so, replica_of)
            for new in so.scheduled_new_reqs:
                assert len(new.block_ids) == 2
                r = replica_of[new.req_id]
                nulls[r] += new.block_ids[1].count(r * bpr)
                assert r * bpr not in new.block_ids[0]  # full attention keeps every page
            sched.update_from_output(so, fake_runner_output(sched, so))
    assert sched.replica_of == {} and nulls[0] > 0 and nulls[1] > 0, nulls
