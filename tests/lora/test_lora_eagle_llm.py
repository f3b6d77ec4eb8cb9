"""LoRA with EAGLE speculative decoding through vllm.LLM, as vLLM serves it: the target runs
each request's adapter (prefill and verify), the EAGLE head drafts without adapters from the
adapted target's hidden states (EAGLE-1: the final ones, through the target's base LM head;
EAGLE-3: the aux states). One batch mixing base and adapter requests (the adapter on
attention, MLP and lm_head) gives transformers+peft's greedy tokens; every draft vLLM's
scheduler received equals a float64 reference head's on transformers+peft's hidden states
of that request's adapter (near ties not compared); drafts are accepted for base and adapter
requests alike, vLLM's count the one the drafts and the output imply; nothing compiles
after warm-up."""

import numpy as np
import pytest

from tests.eagle1_checkpoint import NumpyEagle1, save_tiny_eagle1
from tests.eagle3_checkpoint import HIDDEN, NumpyEagle3, save_tiny_eagle3, save_tiny_llama_target
from tests.lora.lora_helpers import _peft_model, peft_greedy, save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 16
K = 3
MARGIN = 1e-3  # reference drafts whose top two logits are closer are not compared


@pytest.fixture(scope="module")
def target_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_eagle")
    target = save_tiny_llama_target(root / "target")
    adapter = save_adapter(target, root / "adapter", seed=7, r=8, lora_alpha=4,
                           target_modules=["q_proj", "v_proj", "gate_proj", "down_proj",
                                           "lm_head"])
    return target, adapter


def _target_tensors(target) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(target / "model.safetensors"))


def _peft_states(target, adapter, tokens: list[int]):
    """transformers+peft's states of the request's model (adapter None: the base) over
    tokens: (embeddings, each layer's output (pre-norm), final normed) [N, D] each."""
    import torch

    model = _peft_model(str(target), None if adapter is None else str(adapter))
    layers = getattr(model, "get_base_model", lambda: model)().model.layers
    outputs = []
    hooks = [layer.register_forward_hook(
        lambda module, args, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0]))
        for layer in layers]
    try:
        with torch.no_grad():
            out = model(torch.tensor([tokens]), output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    as64 = lambda t: t.numpy().astype(np.float64)  # noqa: E731
    return as64(out.hidden_states[0][0]), [as64(o) for o in outputs], \
        as64(out.hidden_states[-1][0])


def _reference_drafts(step, tokens: list[int], first_hidden, k: int):
    """The k drafts after tokens (first_hidden: the head's h for positions 0..N-2), with the
    margin of each draft's top logit over the next. step(tokens, h) -> (logits of the last
    position, its row for the next step's h, the draft)."""
    tokens, hidden, drafts, margins = list(tokens[1:]), first_hidden, [], []
    for _ in range(k):
        logits, row, draft = step(tokens, hidden)
        top = np.sort(logits)
        drafts.append(draft)
        margins.append(top[-1] - top[-2])
        tokens.append(draft)
        hidden = np.concatenate([hidden, row[None]])
    return drafts, margins


def _eagle1_reference(target, head):
    t = _target_tensors(target)
    ref = NumpyEagle1(head, t["model.embed_tokens.weight"].astype(np.float64),
                      t["lm_head.weight"].astype(np.float64))  # the base LM head: no adapter

    def step(tokens, hidden):
        x = ref.layers(tokens, hidden)[-1]
        logits = ref.lm_head @ x
        return logits, x, int(np.argmax(logits))

    def first_hidden(states):
        return states[2]  # the final (normed) hidden states
    return step, first_hidden


def _eagle3_reference(head):
    ref = NumpyEagle3(head)

    def step(tokens, hidden):
        normed, prenorm = ref.layer(tokens, hidden)
        return ref.t["lm_head.weight"] @ normed[-1], prenorm[-1], ref.draft(normed[-1])

    def first_hidden(states):
        embeds, layer_outputs, _ = states  # aux ids 0, 1, 2: before layer 0, 1, after 1
        return np.concatenate([embeds, *layer_outputs], axis=-1) @ ref.t["fc.weight"].T
    return step, first_hidden


def _record_drafts(monkeypatch) -> dict:
    """req_id -> [(tokens the request had, the drafts scheduled to verify after them)]."""
    from vllm.v1.core.sched.scheduler import Scheduler

    log: dict = {}
    original = Scheduler.schedule

    def schedule(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        for rid, drafts in out.scheduled_spec_decode_tokens.items():
            log.setdefault(rid, []).append((self.requests[rid].num_tokens, list(drafts)))
        return out

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    return log


def _mix_the_aux_states_in(head):
    """The echo head's fc reads the target's embedding (aux 0) only; a share of the adapted
    layers' outputs (aux 1 and 2) makes its drafts depend on them."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(head / "model.safetensors"))
    rng = np.random.default_rng(9)
    fc = tensors["fc.weight"]
    fc[:, HIDDEN:] = 0.3 * rng.standard_normal(fc[:, HIDDEN:].shape) / np.sqrt(2 * HIDDEN)
    save_file(tensors, str(head / "model.safetensors"))
    return head


def _check_lora_with_eagle(target, adapter, method, head, reference, prompts_seed, monkeypatch):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.e2e.engines import metric, num_compilations, shutdown, start_llm

    rng = np.random.default_rng(prompts_seed)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 12, 5, 20)]
    adapters = [None, adapter, None, adapter]
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process
    log = _record_drafts(monkeypatch)
    # Synchronous scheduling: the scheduler then holds the drafts (async: placeholders).
    llm = start_llm(target, enable_lora=True, max_loras=1, max_lora_rank=8, max_num_seqs=4,
                    async_scheduling=False,
                    speculative_config={"method": method, "model": str(head),
                                        "num_speculative_tokens": K})
    try:
        warm = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            lora_request=[None if a is None else LoRARequest("a", 1, str(a))
                                          for a in adapters], use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    # K tokens past the end: vLLM verifies (and counts) drafts beyond max_tokens too.
    longer = [peft_greedy(target, a, p, NUM_NEW + K) for p, a in zip(prompts, adapters)]
    assert got == [out[:NUM_NEW] for out in longer]
    assert longer[1] != peft_greedy(target, None, prompts[1], NUM_NEW + K)  # the adapter matters
    assert compiled == 0
    step, first_hidden = reference
    by_index = {int(rid.split("-")[0]): entries for rid, entries in log.items()}
    assert sorted(by_index) == [0, 1, 2, 3]  # LLM.generate numbers requests in order
    implied, compared, skipped = [0] * len(prompts), 0, 0
    for i, (prompt, out, a) in enumerate(zip(prompts, longer, adapters)):
        tokens = prompt + out
        h = first_hidden(_peft_states(target, a, tokens))
        for n, drafts in by_index[i]:
            following = tokens[n:n + len(drafts)]  # accepted: up to the first that differs
            implied[i] += next((j for j, (d, t) in enumerate(zip(drafts, following)) if d != t),
                               len(following))
            want, margins = _reference_drafts(step, tokens[:n], h[:n - 1], len(drafts))
            for j, (d, w, m) in enumerate(zip(drafts, want, margins)):
                if m < MARGIN:  # a near tie: float32 and float64 may rank it either way
                    skipped += 1
                    break
                assert d == w, (method, i, n, j, drafts, want)
                compared += 1
    print(f"{method} with LoRA k={K}: {drafted:.0f} drafted, {accepted:.0f} accepted "
          f"(per request {implied}); {compared} drafts equal the reference's, {skipped} near "
          "ties not compared")
    assert drafted == sum(len(d) for entries in log.values() for _, d in entries)
    assert compared > 10 * max(skipped, 1)
    assert accepted == sum(implied)
    assert all(implied[i] > 0 for i in range(len(prompts)))  # base and adapter requests


def test_lora_with_eagle1_drafts_from_the_adapted_hidden_states(target_and_adapter, tmp_path,
                                                                monkeypatch):
    target, adapter = target_and_adapter
    head = save_tiny_eagle1(tmp_path / "eagle1", echo=True)
    _check_lora_with_eagle(target, adapter, "eagle", head, _eagle1_reference(target, head),
                           5, monkeypatch)


def test_lora_with_eagle3_drafts_from_the_adapted_aux_states(target_and_adapter, tmp_path,
                                                             monkeypatch):
    target, adapter = target_and_adapter
    embed = _target_tensors(target)["model.embed_tokens.weight"]
    head = _mix_the_aux_states_in(save_tiny_eagle3(tmp_path / "eagle3", (0, 1, 2),
                                                   echo_embed=embed))
    _check_lora_with_eagle(target, adapter, "eagle3", head, _eagle3_reference(head), 2,
                           monkeypatch)
