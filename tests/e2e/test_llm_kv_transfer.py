"""Prefill/decode disaggregation between two vllm.LLM engines (each in its own engine-core
process, both running) through XlaSharedStorageConnector (kv_transfer/): the producer
(tensor parallel 2) prefills with max_tokens=1 and saves each prompt's KV to a shared
directory; the consumer (one device) loads it, computes only the prompt's last token, and
its greedy output is transformers'."""

import shutil

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 8
CONNECTOR = "XlaSharedStorageConnector"


def _transfer_config(role: str, directory, **more) -> dict:
    return dict(kv_connector=CONNECTOR, kv_role=role,
                kv_connector_extra_config={"shared_storage_path": str(directory)}, **more)


def _counts(llm) -> dict:
    return llm.collective_rpc("kv_transfer_counts")[0]


def _generate(llm, prompts):
    """(token ids, num_cached_tokens) per prompt, greedy."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def test_decode_engine_serves_prompts_prefilled_by_another(tmp_path):
    from xla_inference.kv_transfer import storage

    model_dir = save_tiny_llama(tmp_path / "llama")
    directory = tmp_path / "kv"
    rng = np.random.default_rng(5)
    # Pages of 16 tokens: prompts ending inside a page, on its last token, and one that the
    # producer prefills in three chunks (32 tokens a step).
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 17, 33, 90)]
    # Shares its first two pages with prompts[3]: the consumer, having served prompts[3],
    # finds those in its own prefix cache and loads the rest.
    sharing = prompts[3][:32] + rng.integers(3, 128, size=20).tolist()
    # Given prompts[2]'s KV file below: same last token, other tokens before it.
    swapped = rng.integers(3, 128, size=32).tolist() + prompts[2][-1:]
    unsaved = rng.integers(3, 128, size=12).tolist()  # never prefilled by the producer
    expected = hf_greedy_ids(model_dir, prompts + [sharing, swapped, unsaved], NUM_NEW)

    # The producer shards its cache over two devices (KV heads), the consumer keeps one:
    # the files hold whole arrays, so pages move between any two tensor parallel sizes.
    producer = start_llm(model_dir, max_num_batched_tokens=32, tensor_parallel_size=2,
                         kv_transfer_config=_transfer_config("kv_producer", directory))
    try:
        first = generate_ids(producer, prompts + [sharing], max_tokens=1, temperature=0.0)
        saved = _counts(producer)
        producer_mesh = producer.collective_rpc("mesh_shape")[0]
        consumer = start_llm(model_dir, kv_transfer_config=_transfer_config("kv_consumer",
                                                                            directory))
        try:
            warm = num_compilations(consumer)
            got, cached = _generate(consumer, prompts)
            got_sharing, cached_sharing = _generate(consumer, [sharing])
            # A file holding another prompt's KV: the consumer decodes on the KV it loaded,
            # so it answers as for that prompt (proof the prompt was not recomputed).
            key = storage.prompt_key(str(model_dir), swapped)
            shutil.copy(storage.path_for(directory, storage.prompt_key(str(model_dir),
                                                                       prompts[2])),
                        storage.path_for(directory, key))
            got_swapped, _ = _generate(consumer, [swapped])
            got_unsaved, cached_unsaved = _generate(consumer, [unsaved])
            loaded = _counts(consumer)
            compiles = num_compilations(consumer) - warm
        finally:
            shutdown(consumer)
    finally:
        shutdown(producer)

    assert producer_mesh["model"] == 2
    assert saved["saved_requests"] == 5 and saved["loaded_requests"] == 0
    assert saved["saved_tokens"] == sum(len(p) for p in prompts + [sharing])
    assert [f[0] for f in first] == [e[0] for e in expected[:5]]

    assert got == expected[:4]
    assert cached == [len(p) - 1 for p in prompts]  # only the last prompt token computed
    assert got_sharing == [expected[4]] and cached_sharing == [len(sharing) - 1]
    assert got_swapped == [expected[2]] != [expected[5]]
    assert got_unsaved == [expected[6]] and cached_unsaved == [0]
    # sharing: 32 tokens from the consumer's own prefix cache; swapped: 32 from the file.
    loaded_tokens = sum(len(p) - 1 for p in prompts) + (len(sharing) - 1 - 32) + 32
    assert loaded == dict(loaded, loaded_requests=6, loaded_tokens=loaded_tokens,
                          failed_loads=0, saved_requests=0)
    assert compiles == 0
