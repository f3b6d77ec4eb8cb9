"""KV cache offload to host memory (vLLM's OffloadingConnector, kv_transfer/offload.py), one
engine, one run: time to first token of a batch of prompts the engine prefilled before and
whose pages other prompts have since pushed out of the device cache (served from the host
tier: loaded, not prefilled) against a batch of new prompts of the same length (prefilled),
alternated `--repeats` times (which goes first alternates too), medians; the copy cost per
KV page (the worker's store / load timings: the jitted gather or scatter plus the host copy).

    .venv/bin/python benchmarks/kv_offload.py                  # SmolLM2-135M, float32
    .venv/bin/python benchmarks/kv_offload.py --input-len 1000
"""

import json
import os
import statistics
import time

from _kv_bench import kv_llm, parse_args, prompt_batches

PAGE_TOKENS = 16


def _first_token_seconds(llm, prompts) -> tuple[float, list[int]]:
    """Seconds for the batch's first tokens, and each prompt's cached tokens."""
    from vllm import SamplingParams

    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return time.perf_counter() - start, [o.num_cached_tokens for o in outs]


def _evicted(llm, prompts, args) -> list:
    """Run `prompts` (storing their pages in the host tier), then enough other prompts to
    push them out of the device cache; -> the prompts."""
    _first_token_seconds(llm, prompts)
    device_pages = args.kv_cache_memory_bytes // args.page_bytes
    batch_pages = args.num_prompts * (args.input_len // PAGE_TOKENS + 1)
    for _ in range(device_pages // batch_pages + 1):
        _first_token_seconds(llm, args.new_prompts())
    return prompts


def main() -> None:
    from xla_inference.loading.default_model import prepare_default_model

    args = parse_args()
    args.new_prompts = prompt_batches(args)
    model = str(prepare_default_model())
    # SmolLM2-135M: 30 layers x (K, V) x 3 KV heads x 64 x float32 per token.
    args.page_bytes = PAGE_TOKENS * 30 * 2 * 3 * 64 * 4
    llm = kv_llm(model, args, dict(kv_connector="OffloadingConnector", kv_role="kv_both",
                                   kv_connector_extra_config={"cpu_bytes_to_use": 1 << 30}))
    try:
        _first_token_seconds(llm, _evicted(llm, args.new_prompts(), args))  # first runs
        _first_token_seconds(llm, args.new_prompts())
        hits, misses, cached = [], [], []
        for r in range(args.repeats):
            evicted = _evicted(llm, args.new_prompts(), args)
            fresh = args.new_prompts()
            order = [(evicted, hits), (fresh, misses)]
            for prompts, times in order if r % 2 == 0 else order[::-1]:
                seconds, num_cached = _first_token_seconds(llm, prompts)
                times.append(seconds)
                cached.append((prompts is evicted, num_cached))
        counts = llm.collective_rpc("kv_transfer_counts")[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    result = dict(
        model=model, input_len=args.input_len, num_prompts=args.num_prompts,
        ttft_batch_host_hit_s=statistics.median(hits),
        ttft_batch_miss_s=statistics.median(misses),
        cached_tokens_host_hit=sorted({n for hit, ns in cached if hit for n in ns}),
        cached_tokens_miss=sorted({n for hit, ns in cached if not hit for n in ns}),
        store_ms_per_page=1e3 * counts["store_seconds"] / counts["stored_pages"],
        load_ms_per_page=1e3 * counts["load_seconds"] / counts["loaded_pages"],
        bytes_per_page=counts["stored_bytes"] / counts["stored_pages"],
        load_average=os.getloadavg()[0])
    result["ttft_ratio_hit_over_miss"] = (result["ttft_batch_host_hit_s"]
                                          / result["ttft_batch_miss_s"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
