"""--data-parallel-size 2 with --tensor-parallel-size 2 through the README's serve command.

vLLM runs data parallel for dense models as independent engine processes behind one
front-end, which spreads requests over them; each of ours runs one SPMD program over its own
two of the 8 virtual CPU devices (tests/conftest.py). vLLM's LLM class refuses
data_parallel_size > 1, so this goes through the server. Greedy completions must equal the
same model on one device, and both replicas must have served requests.
"""

import concurrent.futures
import re

import httpx
import numpy as np
import pytest

from tests.e2e.engines import shutdown, start_llm
from tests.e2e.test_server import dev_serve
from tests.helpers import save_tiny_family

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


def _single_device_texts(model_dir, prompts) -> list[str]:
    from vllm import SamplingParams

    llm = start_llm(model_dir, **LIMITS)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True),
                            use_tqdm=False)
        return [o.outputs[0].text for o in outs]
    finally:
        shutdown(llm)


def _served_per_engine(url) -> dict[str, float]:
    """vllm:request_success_total summed per engine (DP replica) label."""
    counts = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = re.search(r'engine="(\d+)"', line).group(1)
            counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_data_parallel_2_with_tensor_parallel_2_matches_one_device(model_dir, prompts,
                                                                   tmp_path):
    expected = _single_device_texts(model_dir, prompts)
    log_path = tmp_path / "server.log"
    flags = {"--max-model-len": LIMITS["max_model_len"], "--max-num-seqs": LIMITS["max_num_seqs"],
             "--max-num-batched-tokens": LIMITS["max_num_batched_tokens"],
             "--kv-cache-memory-bytes": 4 << 20, "--seed": 0}
    args = ["--model", str(model_dir), "--dtype", "float32", "--data-parallel-size", "2",
            "--tensor-parallel-size", "2", *[str(x) for kv in flags.items() for x in kv]]
    with dev_serve(args, log_path) as (url, _):
        def complete(prompt):
            body = dict(model=str(model_dir), prompt=prompt, max_tokens=NUM_NEW, temperature=0.0,
                        ignore_eos=True)
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            reply.raise_for_status()
            return reply.json()["choices"][0]["text"]

        # Two rounds of concurrent requests: the front-end balances them over both replicas.
        for _ in range(2):
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                assert list(pool.map(complete, prompts)) == expected
        served = _served_per_engine(url)
        assert sorted(served) == ["0", "1"], served
        assert all(n > 0 for n in served.values()), served
        log = log_path.read_text()
        assert "'data': 1, 'model': 2" in log  # each replica's mesh: 2 devices for TP
