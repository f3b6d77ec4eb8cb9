"""Random PEFT adapters saved by `peft`, and transformers+peft as the reference."""

import functools
from pathlib import Path

import numpy as np

# (name, LoraConfig fields): ranks differ; rslora, alpha/rank patterns and a partial target list
ADAPTERS = [
    ("a4", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("a8", dict(r=8, lora_alpha=16, use_rslora=True,
                target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                alpha_pattern={"down_proj": 4})),
    ("a16", dict(r=16, lora_alpha=32, rank_pattern={"o_proj": 6},
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"])),
]


def save_adapter(model_dir: Path, out: Path, seed: int, **fields) -> Path:
    """A PEFT LoRA adapter of random A and B (B nonzero, unlike PEFT's default init)."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def save_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    return {name: save_adapter(model_dir, root / name, seed=10 + i, **fields)
            for i, (name, fields) in enumerate(ADAPTERS)}


@functools.lru_cache(maxsize=8)
def _peft_model(model_dir: str, adapter: str | None):
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter is None:
        return base.eval()
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def peft_logits(model_dir: Path, adapter: Path | None, token_ids: list[int]) -> np.ndarray:
    import torch

    model = _peft_model(str(model_dir), None if adapter is None else str(adapter))
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def peft_greedy(model_dir: Path, adapter: Path | None, prompt: list[int], num_new: int) -> list[int]:
    ids = list(prompt)
    for _ in range(num_new):
        ids.append(int(np.argmax(peft_logits(model_dir, adapter, ids)[-1])))
    return ids[len(prompt):]


def lora_requests(adapters: dict[str, Path]) -> list:
    """vLLM's requests for `adapters` in order (ids from 1), after None: the base model."""
    from vllm.lora.request import LoRARequest

    return [None] + [LoRARequest(name, i, str(path))
                     for i, (name, path) in enumerate(adapters.items(), start=1)]


def generate_mixed(llm, prompts: list[list[int]], chosen: list, num_new: int):
    """(greedy ids of each prompt under its chosen adapter, in one generate() call; programs
    compiled by that call)."""
    from vllm import SamplingParams

    from tests.e2e.engines import num_compilations

    before = num_compilations(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=num_new, temperature=0.0, ignore_eos=True),
                        lora_request=chosen, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], num_compilations(llm) - before


def peft_expected(model_dir: Path, adapters: dict[str, Path], prompts: list[list[int]],
                  chosen: list, num_new: int) -> list[list[int]]:
    """transformers+peft's greedy ids of each prompt under its chosen adapter (None: base)."""
    return [peft_greedy(model_dir, None if r is None else adapters[r.lora_name], p, num_new)
            for p, r in zip(prompts, chosen)]
