"""Prefill/decode disaggregation through XlaNetworkConnector (TCP on this machine), one run:
a prefill engine (kv_producer) and a decode engine (kv_consumer), both running. Each round,
N prompts go the disaggregated way (the prefill engine with max_tokens=1 and
do_remote_decode, then the decode engine with its kv_transfer_params: the decode engine
fetches the pages) and N other prompts of the same length are prefilled by the decode
engine itself; rounds alternate which goes first; medians over `--repeats` rounds. Also the
transfer cost per 16-token page from the connectors' own timings.

    .venv/bin/python benchmarks/kv_network.py                 # SmolLM2-135M, float32
    .venv/bin/python benchmarks/kv_network.py --input-len 1000
"""

import json
import statistics
import time

from _kv_bench import kv_llm, parse_args, prompt_batches
from _server import free_port

PAGE = 16


def _llm(model, role, port, args):
    return kv_llm(model, args, dict(kv_connector="XlaNetworkConnector", kv_role=role,
                                    kv_port=port))


def _first_tokens(llm, prompts, params=None):
    """-> (seconds, outputs) for max_tokens=1 on a batch; params: kv_transfer_params per
    prompt."""
    from vllm import SamplingParams

    sampling = [SamplingParams(max_tokens=1, temperature=0.0,
                               extra_args=None if params is None else
                               {"kv_transfer_params": params[i]})
                for i in range(len(prompts))]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    return time.perf_counter() - start, outs


def _disaggregated(producer, consumer, prompts):
    """-> (prefill engine seconds, decode engine seconds, first tokens agree)."""
    t_prefill, outs = _first_tokens(producer, prompts, [{"do_remote_decode": True}] * len(prompts))
    t_decode, decoded = _first_tokens(consumer, prompts, [o.kv_transfer_params for o in outs])
    same = [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in decoded]
    return t_prefill, t_decode, same


def main() -> None:
    import os

    from xla_inference.loading.default_model import prepare_default_model

    args = parse_args()
    model = str(prepare_default_model())
    prompts = prompt_batches(args)

    producer = _llm(model, "kv_producer", free_port(), args)
    consumer = _llm(model, "kv_consumer", free_port(), args)
    try:
        _disaggregated(producer, consumer, prompts())  # untimed: first runs of each program
        _first_tokens(consumer, prompts())
        rounds = []
        for r in range(args.repeats):
            remote, local = prompts(), prompts()
            if r % 2:
                t_local = _first_tokens(consumer, local)[0]
                t_prefill, t_decode, same = _disaggregated(producer, consumer, remote)
            else:
                t_prefill, t_decode, same = _disaggregated(producer, consumer, remote)
                t_local = _first_tokens(consumer, local)[0]
            rounds.append((t_prefill, t_decode, t_local, same))
        served = producer.collective_rpc("kv_transfer_counts")[0]
        loaded = consumer.collective_rpc("kv_transfer_counts")[0]
    finally:
        for llm in (producer, consumer):
            llm.llm_engine.engine_core.shutdown()
    pages = loaded["loaded_tokens"] / PAGE
    result = dict(
        model=model, input_len=args.input_len, num_prompts=args.num_prompts,
        load_average=os.getloadavg()[0],
        prefill_engine_batch_s=statistics.median(r[0] for r in rounds),
        decode_engine_ttft_batch_fetched_s=statistics.median(r[1] for r in rounds),
        decode_engine_ttft_batch_prefilled_itself_s=statistics.median(r[2] for r in rounds),
        first_tokens_agree=all(r[3] for r in rounds),
        fetch_ms_per_page=1e3 * loaded["fetch_seconds"] / pages,
        scatter_ms_per_page=1e3 * loaded["scatter_seconds"] / pages,
        gather_ms_per_page=1e3 * served["gather_seconds"] / (served["served_tokens"] / PAGE),
        bytes_per_page=loaded["loaded_bytes"] / pages,
        loaded_requests=loaded["loaded_requests"], failed_loads=loaded["failed_loads"],
        expired_leases=served["expired_leases"])
    result["ttft_ratio_fetched_over_prefilled"] = (
        result["decode_engine_ttft_batch_fetched_s"]
        / result["decode_engine_ttft_batch_prefilled_itself_s"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
