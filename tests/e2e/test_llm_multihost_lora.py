"""LoRA adapters across two JAX processes ("hosts"), one virtual CPU device each, tensor
parallel 2 over both (plugin/multihost.py): every process holds its half of each adapter's
stacks, so each must make the same slot writes, in the same order, before the step that
reads them. The driver's add_lora calls and each step's scheduler output (whose new
requests name their adapter's path) reach the follower in order, and it reads the PEFT
files from the same path. A batch mixing the base model and two adapters, then an adapter
added at run time (with two slots for three adapters: a slot rewritten on both processes
mid-run), give transformers+peft's greedy output."""

import numpy as np
import pytest

from tests.e2e.engines import num_compilations, shutdown, start_llm
from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import ADAPTERS, peft_greedy, save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8


def test_lora_mixed_batch_and_a_run_time_adapter_across_two_processes(tmp_path, monkeypatch):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = save_tiny_llama(tmp_path / "llama")
    paths = {name: save_adapter(model_dir, tmp_path / name, seed=10 + i, **fields)
             for i, (name, fields) in enumerate(ADAPTERS)}
    first = [LoRARequest("a4", 1, str(paths["a4"])), LoRARequest("a8", 2, str(paths["a8"]))]
    late = LoRARequest("a16", 3, str(paths["a16"]))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 11, 27, 9, 14)]
    chosen = [[None, *first][i % 3] for i in range(len(prompts))]
    late_prompts, late_chosen = prompts[:3], [late, None, late]
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)

    def generate(llm, prompts, loras):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                            lora_request=loras, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    llm = start_llm(model_dir, tensor_parallel_size=2, enable_lora=True, max_loras=2,
                    max_lora_rank=16, max_cpu_loras=3, max_num_seqs=4,
                    max_num_batched_tokens=32)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        before = num_compilations(llm)
        got = generate(llm, prompts, chosen)
        # At run time, by the engine's add_lora (vLLM's /v1/load_lora_adapter path): every
        # process reads it; its first step then evicts one of the two slots on both.
        assert llm.llm_engine.add_lora(late)
        writes_before_late = llm.collective_rpc("lora_slot_writes")[0]
        got_late = generate(llm, late_prompts, late_chosen)
        loaded = llm.collective_rpc("list_loras")[0]
        writes = llm.collective_rpc("lora_slot_writes")[0]
        after = num_compilations(llm)
    finally:
        shutdown(llm)
    adapter_path = lambda r: None if r is None else paths[r.lora_name]  # noqa: E731
    want = [peft_greedy(model_dir, adapter_path(r), p, NUM_NEW) for p, r in zip(prompts, chosen)]
    want_late = [peft_greedy(model_dir, adapter_path(r), p, NUM_NEW)
                 for p, r in zip(late_prompts, late_chosen)]
    assert got == want
    assert got_late == want_late
    assert len({tuple(w) for w in want + want_late}) == len(want) + len(want_late)
    assert set(loaded) == {1, 2, 3}
    assert writes > writes_before_late  # the late adapter took a slot on every process
    assert after == before
