"""--data-parallel-size 2 with --tensor-parallel-size 2 through the README's serve command.

xla-inference runs the two replicas inside one engine process: vLLM is told data parallel
1, our scheduler runs one vLLM scheduler per replica (each with its own requests and KV
pages) and the engine runs both replicas' batches in one SPMD program over a (data 2,
model 2) mesh of the 8 virtual CPU devices (tests/conftest.py). Greedy completions of
concurrent requests must equal the same model on one device: transformers' greedy output,
token for token, which one device gives (tests/e2e/test_llm_families.py). (That both
replicas take requests is checked through vllm.LLM in tests/e2e/test_llm_parallel.py.)
"""

import concurrent.futures

import httpx
import numpy as np
import pytest

from tests.e2e.test_server import dev_serve
from tests.helpers import hf_greedy_ids, save_tiny_family

pytestmark = pytest.mark.slow

NUM_NEW = 12
LIMITS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_family(tmp_path_factory.mktemp("dp") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(9)
    return [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 40, 13, 31, 5, 22, 18)]


def test_data_parallel_2_with_tensor_parallel_2_matches_one_device(model_dir, prompts,
                                                                   tmp_path):
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    log_path = tmp_path / "server.log"
    flags = {"--max-model-len": LIMITS["max_model_len"], "--max-num-seqs": LIMITS["max_num_seqs"],
             "--max-num-batched-tokens": LIMITS["max_num_batched_tokens"],
             "--kv-cache-memory-bytes": 4 << 20, "--seed": 0}
    args = ["--model", str(model_dir), "--dtype", "float32", "--data-parallel-size", "2",
            "--tensor-parallel-size", "2", *[str(x) for kv in flags.items() for x in kv]]
    with dev_serve(args, log_path) as (url, _):
        def complete(prompt):
            body = dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                        ignore_eos=True, return_token_ids=True)
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            reply.raise_for_status()
            return reply.json()["choices"][0]["token_ids"]

        # Two rounds of concurrent requests: the scheduler spreads them over both replicas.
        for _ in range(2):
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                assert list(pool.map(complete, prompts)) == expected
        log = log_path.read_text()
        assert "'data': 2, 'model': 2" in log  # one engine, one mesh for both replicas
        assert log.count("xla-inference: KV cache of") == 1
