"""Prefill/decode disaggregation through XlaSharedStorageConnector between two vllm.LLM
engines each spanning two JAX processes (tensor parallel 2 across them, one device each,
distributed/multihost.py): every process of the producer saves its own KV heads of each prompt
(one file per process), every process of the consumer loads its own, and the consumer's
greedy output is transformers' with the prompts' pages loaded, not recomputed (counted on
each process; a file swapped under another prompt changes the answer). A prompt whose KV
the directory holds as a one-process engine writes it is refused on both processes, the
error naming both layouts."""

import re
import shutil

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 8


def _transfer_config(role: str, directory) -> dict:
    return dict(kv_connector="XlaSharedStorageConnector", kv_role=role,
                kv_connector_extra_config={"shared_storage_path": str(directory)})


def _generate(llm, prompts):
    """(token ids, num_cached_tokens, finish reasons) per prompt, greedy."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs],
            [o.outputs[0].finish_reason for o in outs])


def test_shared_storage_between_engines_across_two_processes_each(tmp_path, monkeypatch,
                                                                 capfd):
    from xla_inference.kv_transfer import storage

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = save_tiny_llama(tmp_path / "llama")  # 2 KV heads: one on each process
    directory = tmp_path / "kv"
    rng = np.random.default_rng(5)
    # Pages of 16 tokens; the 40-token prompt is prefilled in two chunks (32 tokens a step).
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 17, 40)]
    swapped = rng.integers(3, 128, size=32).tolist() + prompts[2][-1:]
    expected = hf_greedy_ids(model_dir, prompts + [swapped], NUM_NEW)

    producer = start_llm(model_dir, tensor_parallel_size=2, max_num_batched_tokens=32,
                         kv_transfer_config=_transfer_config("kv_producer", directory))
    try:
        assert producer.collective_rpc("mesh_processes")[0] == [0, 1]
        first = generate_ids(producer, prompts, max_tokens=1, temperature=0.0)
        saved = producer.collective_rpc("kv_transfer_counts_by_process")[0]
    finally:
        shutdown(producer)
    assert [f[0] for f in first] == [e[0] for e in expected[:3]]
    assert len(saved) == 2
    for counts in saved:  # each process saved its heads of every prompt
        assert counts["saved_requests"] == 3 and counts["saved_tokens"] == 62
    keys = [storage.prompt_key(str(model_dir), p) for p in prompts]
    assert sorted(f.name for f in directory.iterdir()) == sorted(
        f"{k}.p{i}of2.kv.npz" for k in keys for i in range(2))

    # A prompt whose KV the directory holds as a one-process engine writes it (every KV
    # head in one file; the values do not matter): not this consumer's layout.
    odd = rng.integers(3, 128, size=20).tolist()
    header = storage.read_header(directory / f"{keys[0]}.p0of2.kv.npz")
    storage.save(storage.path_for(directory, storage.prompt_key(str(model_dir), odd)),
                 [tuple(np.zeros((len(odd), 2 * shape[0], shape[1]), dtype)
                        for shape, dtype in arrays) for arrays in header["sets"]])

    consumer = start_llm(model_dir, tensor_parallel_size=2,
                         kv_transfer_config=_transfer_config("kv_consumer", directory))
    try:
        warm = num_compilations(consumer)
        got, cached, _ = _generate(consumer, prompts)
        # Both processes' files of prompts[2] under `swapped`'s name: the consumer decodes on
        # the KV it loaded, so it answers as for prompts[2].
        swapped_key = storage.prompt_key(str(model_dir), swapped)
        for i in range(2):
            shutil.copy(directory / f"{keys[2]}.p{i}of2.kv.npz",
                        directory / f"{swapped_key}.p{i}of2.kv.npz")
        got_swapped, _, _ = _generate(consumer, [swapped])
        loaded = consumer.collective_rpc("kv_transfer_counts_by_process")[0]
        capfd.readouterr()
        _, _, reasons = _generate(consumer, [odd])
        refused = consumer.collective_rpc("kv_transfer_counts_by_process")[0]
        compiles = num_compilations(consumer) - warm
    finally:
        shutdown(consumer)
    assert got == expected[:3]
    assert cached == [len(p) - 1 for p in prompts]  # only each prompt's last token computed
    assert got_swapped == [expected[2]] != [expected[3]]
    assert len(loaded) == 2
    for counts in loaded:  # every process loaded its heads of every prompt
        assert counts["loaded_requests"] == 4 and counts["failed_loads"] == 0
        assert counts["loaded_tokens"] == sum(len(p) - 1 for p in prompts) + 32
    assert compiles == 0

    # The one-process file: refused on both processes, the request failed
    # (kv_load_failure_policy "fail", vLLM's default), the error naming both layouts.
    assert reasons == ["error"]
    assert [c["failed_loads"] for c in refused] == [1, 1]
    assert [c["loaded_requests"] for c in refused] == [4, 4]
    out = capfd.readouterr()
    refusals = re.findall(r"written by an engine of another layout \((.*?)\); this reader is "
                          r"(.*?): not loaded", out.out + out.err)
    assert sorted(refusals) == [
        ("one process (every KV head)", f"process {i} of 2 (KV heads [{i}, {i + 1}) of 2"
         + f", [{i}, {i + 1}) of 2" * (len(header["sets"]) - 1) + " of each cache set)")
        for i in range(2)], (out.out + out.err)[-3000:]


PAGE_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # tokens x layers x (K, V) x kv heads x head size x fp32


def test_offload_across_two_processes_each_keeping_its_heads(tmp_path, monkeypatch):
    """vLLM's OffloadingConnector, TP 2 across two processes: a long prompt evicted from the
    device comes back from the host tier, each process restoring its own KV heads from its
    own tier, with the greedy tokens of its first run and of transformers."""
    from vllm import SamplingParams

    from tests.e2e.engines import metric

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(31)
    long = rng.integers(3, 128, size=96).tolist()  # 6 pages, all stored
    others = [rng.integers(3, 128, size=90).tolist() for _ in range(4)]
    expected = hf_greedy_ids(model_dir, [long], NUM_NEW)[0]
    llm = start_llm(model_dir, kv_cache_memory_bytes=12 * PAGE_BYTES, max_num_seqs=2,
                    tensor_parallel_size=2, kv_transfer_config=dict(
                        kv_connector="OffloadingConnector", kv_role="kv_both",
                        kv_connector_extra_config={"cpu_bytes_to_use": 40 * PAGE_BYTES}))

    def run(prompts):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
        return list(outs[0].outputs[0].token_ids), outs[0].num_cached_tokens

    try:
        miss = run([long])
        run(others[:2])  # 6 more pages, then 6 more: the long prompt's leave the device
        run(others[2:])
        hit = run([long])
        counts = llm.collective_rpc("kv_transfer_counts_by_process")[0]
        external_hits = metric(llm, "vllm:external_prefix_cache_hits")
    finally:
        shutdown(llm)
    assert miss == (expected, 0)
    assert hit == (expected, 96)
    assert external_hits == 96
    assert [c["loaded_pages"] for c in counts] == [6, 6]  # each process its heads of them
    assert [c["loaded_bytes"] for c in counts] == [3 * PAGE_BYTES] * 2
