"""What benchmarks/kv_transfer.py (shared storage) and benchmarks/kv_network.py (the network
connector) share: their arguments, an offline engine with a KV connector, and batches of
random prompts of the same length."""

import argparse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input-len", type=int, default=480)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    return parser.parse_args()


def kv_llm(model: str, args: argparse.Namespace, kv_transfer_config: dict):
    """A float32 engine for `model` sized by `args`, with the KV connector of
    `kv_transfer_config` (vLLM's KVTransferConfig fields)."""
    from vllm import LLM

    return LLM(model=model, dtype="float32", max_model_len=args.input_len + 16,
               max_num_seqs=args.num_prompts, max_num_batched_tokens=args.max_num_batched_tokens,
               kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=0,
               kv_transfer_config=kv_transfer_config)


def prompt_batches(args: argparse.Namespace):
    """A function giving a new batch of `num_prompts` random prompts of `input_len` tokens
    at each call (the same sequence of batches on every run)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def prompts():
        return [rng.integers(100, 40000, size=args.input_len).tolist()
                for _ in range(args.num_prompts)]

    return prompts
