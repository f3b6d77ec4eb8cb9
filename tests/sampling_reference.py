"""Plain-numpy versions of vLLM's sampling rules, and a transformers greedy decode using them."""

from pathlib import Path

import numpy as np


def vllm_processed_logits(logits, opts, prompt, output, allowed_by_grammar=None):
    """vLLM's order: grammar, allowed ids, bad words, min_tokens, logit bias, then penalties."""
    x = logits.astype(np.float64).copy()
    if allowed_by_grammar is not None:
        x[~allowed_by_grammar] = -np.inf
    if opts.allowed_token_ids is not None:
        mask = np.ones_like(x, bool)
        mask[list(opts.allowed_token_ids)] = False
        x[mask] = -np.inf
    for word in opts.bad_words:
        prefix = list(word[:-1])
        if len(prefix) <= len(output) and (not prefix or output[-len(prefix):] == prefix):
            x[word[-1]] = -np.inf
    if len(output) < opts.min_tokens:
        x[list(opts.stop_token_ids)] = -np.inf
    for token, bias in opts.logit_bias:
        x[token] += bias
    counts = np.bincount(output, minlength=x.size).astype(np.float64)
    seen = (counts > 0) | np.isin(np.arange(x.size), prompt)
    r = opts.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    return x - opts.frequency_penalty * counts - opts.presence_penalty * (counts > 0)


def hf_processed_greedy(model_dir: Path, prompt: list[int], num_new: int, opts,
                        stop_ids=()) -> list[int]:
    """Greedy decode with transformers, each step's logits processed by vLLM's rules
    (`opts` is a SamplingOptions); stops after a token in `stop_ids`."""
    import torch

    from tests.helpers import hf_model

    model = hf_model(model_dir)
    tokens, output = list(prompt), []
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(torch.tensor([tokens])).logits[0, -1].numpy()
            token = int(np.argmax(vllm_processed_logits(logits, opts, prompt, output)))
            tokens.append(token)
            output.append(token)
            if token in stop_ids:
                break
    return output
