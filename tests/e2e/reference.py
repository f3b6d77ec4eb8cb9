"""Independent references: transformers' own Llama, loading the GGUF with its own dequantizer."""

from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Water boils at",
    "List three primary colors:",
    "Translate to French: 'Good morning, how are you today?'",
    "The theory of general relativity, published by Albert Einstein in 1915, describes gravity "
    "not as a force but as a consequence of the curvature of spacetime caused by mass and energy. "
    "One of its most famous predictions is",
    "Q: What is 12 times 12?\nA:",
]


def prompt_token_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(p)["input_ids"] for p in PROMPTS]


def hf_greedy(gguf_path: Path, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """Greedy continuation of each prompt with transformers (float32), ignoring EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            generated = []
            for _ in range(num_new):
                token = int(out.logits[0, -1].argmax())
                generated.append(token)
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values,
                            use_cache=True)
            outputs.append(generated)
    return outputs


def hf_log_softmax(gguf_path: Path, token_ids: list[int]):
    """float64 log-softmax [len, V] of transformers' float32 logits over `token_ids`."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].numpy().astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
