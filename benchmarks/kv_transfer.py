"""Prefill/decode disaggregation through XlaSharedStorageConnector, one run: a producer
engine prefills N prompts (max_tokens=1, saving their KV to a directory), a consumer engine
then answers them; the consumer's time to first token for the loaded prompts against N
other prompts of the same length it prefills itself (same engine, same run, each set
timed `--repeats` times with new prompts, median), and the copy cost per KV page (the
connector's own save / load timings: gather or scatter plus the file).

    .venv/bin/python benchmarks/kv_transfer.py                 # SmolLM2-135M, float32
    .venv/bin/python benchmarks/kv_transfer.py --input-len 1000
"""

import json
import statistics
import tempfile
import time

from _kv_bench import kv_llm, parse_args, prompt_batches


def _llm(model, role, directory, args):
    return kv_llm(model, args, dict(kv_connector="XlaSharedStorageConnector", kv_role=role,
                                    kv_connector_extra_config={"shared_storage_path": directory}))


def _first_token_seconds(llm, prompts) -> float:
    from vllm import SamplingParams

    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    from xla_inference.loading.default_model import prepare_default_model

    args = parse_args()
    model = str(prepare_default_model())
    prompts = prompt_batches(args)

    with tempfile.TemporaryDirectory() as directory:
        sets = [(prompts(), prompts()) for _ in range(args.repeats + 1)]  # (loaded, local)
        producer = _llm(model, "kv_producer", directory, args)
        for loaded, _ in sets:
            _first_token_seconds(producer, loaded)
        saved = producer.collective_rpc("kv_transfer_counts")[0]
        producer.llm_engine.engine_core.shutdown()
        del producer
        consumer = _llm(model, "kv_consumer", directory, args)
        _first_token_seconds(consumer, sets[0][0])  # untimed: first runs of each program
        _first_token_seconds(consumer, sets[0][1])
        timed = [(_first_token_seconds(consumer, loaded), _first_token_seconds(consumer, local))
                 for loaded, local in sets[1:]]
        loaded_counts = consumer.collective_rpc("kv_transfer_counts")[0]
        consumer.llm_engine.engine_core.shutdown()
    page = 16
    result = dict(
        model=model, input_len=args.input_len, num_prompts=args.num_prompts,
        ttft_batch_loaded_s=statistics.median(t for t, _ in timed),
        ttft_batch_prefilled_s=statistics.median(t for _, t in timed),
        save_ms_per_page=1e3 * saved["save_seconds"] / (saved["saved_tokens"] / page),
        load_ms_per_page=1e3 * loaded_counts["load_seconds"] / (loaded_counts["loaded_tokens"] / page),
        bytes_per_page=saved["saved_bytes"] / (saved["saved_tokens"] / page),
        loaded_requests=loaded_counts["loaded_requests"])
    result["ttft_ratio_loaded_over_prefilled"] = (result["ttft_batch_loaded_s"]
                                                  / result["ttft_batch_prefilled_s"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
