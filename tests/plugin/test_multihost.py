"""The multi-host executor's start-up rules without an engine: which executor vLLM is given,
what is refused, and followers that never join (distributed/multihost.py). The engine across
two processes is tests/e2e/test_llm_multihost.py."""

import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from types import SimpleNamespace

import pytest

from xla_inference.distributed.multihost import EXECUTOR, FollowerGroup, split_address
from xla_inference.plugin.platform import _executor_backend

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM's executor


def _parallel(backend=None, nnodes=1):
    return SimpleNamespace(distributed_executor_backend=backend, nnodes=nnodes)


def test_one_host_keeps_the_single_process_executor(monkeypatch):
    monkeypatch.delenv("XLA_INFERENCE_HOSTS", raising=False)
    assert _executor_backend(_parallel("mp")) == "uni"
    assert _executor_backend(_parallel(None)) == "uni"


def test_hosts_or_the_executor_name_select_the_multihost_executor(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    assert _executor_backend(_parallel("mp")) == EXECUTOR
    monkeypatch.delenv("XLA_INFERENCE_HOSTS")
    assert _executor_backend(_parallel(EXECUTOR)) == EXECUTOR
    # The qualname the README gave before the executor moved to distributed/.
    assert _executor_backend(_parallel("xla_inference.plugin.multihost.MultiHostExecutor")) \
        == EXECUTOR


def test_ray_selects_our_ray_executor_and_needs_the_host_count(monkeypatch):
    from xla_inference.distributed.ray_executor import EXECUTOR as RAY_EXECUTOR
    from xla_inference.distributed.ray_executor import RayMultiHostExecutor

    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    assert _executor_backend(_parallel("ray")) == RAY_EXECUTOR
    assert _executor_backend(_parallel(RAY_EXECUTOR)) == RAY_EXECUTOR
    assert _executor_backend(_parallel(RayMultiHostExecutor)) == RAY_EXECUTOR
    old = "xla_inference.plugin.ray_executor.RayMultiHostExecutor"  # before distributed/
    assert _executor_backend(_parallel(old)) == RAY_EXECUTOR
    monkeypatch.delenv("XLA_INFERENCE_HOSTS")
    with pytest.raises(ValueError, match="set XLA_INFERENCE_HOSTS to the number of hosts"):
        _executor_backend(_parallel("ray"))


def test_vllms_ray_executor_and_nnodes_are_refused_by_name(monkeypatch):
    from vllm.v1.executor.ray_executor import RayDistributedExecutor

    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    with pytest.raises(ValueError, match="vLLM's Ray executor RayDistributedExecutor"):
        _executor_backend(_parallel(RayDistributedExecutor))
    with pytest.raises(ValueError, match="--nnodes"):
        _executor_backend(_parallel("mp", nnodes=2))


def test_split_address():
    assert split_address("10.0.0.1:1234") == ("10.0.0.1", 1234)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address("10.0.0.1")


def test_a_follower_that_never_joins_fails_start_up_naming_it():
    group = FollowerGroup(3, ("127.0.0.1", 0), b"key")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"follower process\(es\) \[1, 2\] did not join"):
        group.accept_all(timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_a_local_follower_that_exits_before_joining_is_named_with_its_exit_code():
    group = FollowerGroup(2, ("127.0.0.1", 0), b"key")
    group.processes[1] = subprocess.Popen([sys.executable, "-c", "exit(3)"])
    group.processes[1].wait()
    with pytest.raises(RuntimeError, match="follower process 1 .* exited with code 3 before"):
        group.accept_all(timeout_s=30.0)


def test_what_has_not_run_across_processes_is_refused_by_name():
    from xla_inference.plugin.platform import _refuse_untested_across_hosts

    model = SimpleNamespace(runner_type="generate", model_impl="auto", attn_type="decoder",
                            supports_multimodal_inputs=False, is_moe=False)
    config = SimpleNamespace(model_config=model, speculative_config=None, kv_transfer_config=None,
                             lora_config=None, additional_config={},
                             parallel_config=SimpleNamespace(pipeline_parallel_size=1,
                                                             data_parallel_size=1))
    _refuse_untested_across_hosts(config)  # a native decoder: served
    config.additional_config["xla_data_parallel_size"] = 2
    _refuse_untested_across_hosts(config)  # with data parallel replicas too
    config.parallel_config.pipeline_parallel_size = 2
    _refuse_untested_across_hosts(config)  # both at once (tests/e2e/test_llm_multihost_pp_dp)
    config.additional_config["xla_data_parallel_size"] = 1
    _refuse_untested_across_hosts(config)  # in pipeline stages (tests/e2e/test_llm_multihost)
    config.lora_config = object()
    _refuse_untested_across_hosts(config)  # LoRA (tests/e2e/test_llm_multihost_lora_spec)
    # Every speculative method: n-gram (tests/e2e/test_llm_multihost_lora_spec), the device
    # drafters (tests/e2e/test_llm_multihost_spec_pooling).
    for method in ("ngram", "eagle3", "eagle", "draft_model", "mtp"):
        config.speculative_config = SimpleNamespace(method=method)
        _refuse_untested_across_hosts(config)
    config.speculative_config = None
    # Shared storage and offload: each process moves its own KV heads
    # (tests/e2e/test_llm_multihost_kv.py, tests/kv_transfer/test_process_shards.py).
    config.kv_transfer_config = SimpleNamespace(kv_connector="XlaSharedStorageConnector")
    _refuse_untested_across_hosts(config)
    config.kv_transfer_config.kv_connector = "OffloadingConnector"
    _refuse_untested_across_hosts(config)
    config.additional_config["xla_data_parallel_size"] = 2
    with pytest.raises(ValueError, match=r"KV connectors .* with data parallel replicas across"):
        _refuse_untested_across_hosts(config)
    config.additional_config["xla_data_parallel_size"] = 1
    config.kv_transfer_config.kv_connector = "XlaNetworkConnector"
    with pytest.raises(ValueError, match=r"XlaNetworkConnector across several JAX processes"):
        _refuse_untested_across_hosts(config)
    config.kv_transfer_config = None
    model.is_moe = True
    _refuse_untested_across_hosts(config)  # an MoE model, one replica
    config.additional_config["xla_data_parallel_size"] = 2
    _refuse_untested_across_hosts(config)  # and with data parallel replicas
    model.is_moe = False
    model.runner_type = "pooling"
    _refuse_untested_across_hosts(config)  # a decoder's embeddings or scores
    model.attn_type = "encoder_only"
    _refuse_untested_across_hosts(config)  # a BERT-style embedder (the torch path)
    model.runner_type, model.attn_type = "generate", "decoder"
    model.supports_multimodal_inputs = True
    _refuse_untested_across_hosts(config)  # images (tests/e2e/test_llm_multihost_spec_pooling)
    model.supports_multimodal_inputs = False
    model.model_impl = "vllm"
    _refuse_untested_across_hosts(config)  # the torch path (the same)


def test_the_follower_group_reports_dead_local_followers():
    group = FollowerGroup(2, ("127.0.0.1", 0), b"key")
    group.processes[1] = subprocess.Popen([sys.executable, "-c", "exit(0)"])
    group.processes[1].wait()
    assert group.dead() == [1]
    group.stop(timeout_s=1.0)


def test_a_follower_gone_before_shutdown_is_named_there(monkeypatch):
    """A data parallel step that lost a follower fails at once and can end the engine
    before that follower's watcher runs: shutdown still names it, and waits on no live one."""
    monkeypatch.setattr(FollowerGroup, "_exit_after_grace", lambda self: None)
    group = FollowerGroup(3, ("127.0.0.1", 0), b"key")
    (group.connections[1], live), (group.connections[2], gone) = Pipe(), Pipe()
    start = time.monotonic()
    assert not group.lost_before_stop()
    assert time.monotonic() - start < 1
    gone.close()
    assert group.lost_before_stop(wait_s=0.5)
    assert group.failure.startswith("xla-inference multi-host: follower process 2 closed its "
                                    "connection"), group.failure
    live.close()


def test_after_an_engine_error_shutdown_waits_for_the_loss_to_show(monkeypatch):
    """A killed Ray actor's collectives can fail the step before its control socket closes:
    when the engine core stops on an error, shutdown waits (bounded) for the loss to show and
    names the follower; without an error it answers at once."""
    monkeypatch.setattr(FollowerGroup, "_exit_after_grace", lambda self: None)
    group = FollowerGroup(2, ("127.0.0.1", 0), b"key")
    group.connections[1], far_end = Pipe()
    threading.Timer(0.4, far_end.close).start()
    start = time.monotonic()
    assert group.lost_before_stop(wait_s=5.0, after_error=True)
    assert 0.3 < time.monotonic() - start < 3
    assert "follower process 1 closed its connection" in group.failure

    quiet = FollowerGroup(2, ("127.0.0.1", 0), b"key")
    quiet.connections[1], alive = Pipe()
    start = time.monotonic()
    assert not quiet.lost_before_stop(wait_s=0.5, after_error=True)  # bounded
    assert time.monotonic() - start < 2
    alive.close()


def test_a_follower_ngram_drafter_proposes_nothing():
    """Across hosts only the driver's n-gram drafts reach vLLM (they ride the verify step's
    scheduler output to every process): a follower's drafter does no prompt lookup."""
    from xla_inference.plugin.spec_decode import NgramDrafter

    drafter = object.__new__(NgramDrafter)  # no vLLM proposer: it must not be called
    drafter.proposes = False
    requests = [SimpleNamespace(req_id="a", token_ids=[5, 6, 5, 6, 5]),
                SimpleNamespace(req_id="b", token_ids=[7])]
    drafts = drafter.propose(requests, [[5], [7]])
    assert drafts.req_ids == ["a", "b"] and drafts.draft_token_ids == [[], []]
