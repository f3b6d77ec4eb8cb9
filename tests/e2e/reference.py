"""Independent references: transformers' own Llama, loading the GGUF with its own dequantizer."""

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
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


# Every continuation is computed this many tokens long, the most any test asks for; a test
# asking for fewer reads its beginning. Greedy decoding's first n tokens are the same
# computation however many follow, so modules asking for different lengths (Gemma 3's 24 and
# 32) share one run of transformers. That run is slow: loading reads the GGUF's metadata
# (Gemma's 262k-token vocabulary) twice and dequantizes every tensor, and each token decoded
# reads the whole float32 model (1 GB for Gemma 3 270M).
REFERENCE_NEW = 32


def hf_greedy(gguf_path: Path, prompts: list[list[int]], num_new: int,
              load_model=None) -> list[list[int]]:
    """Greedy continuation of each prompt with transformers (float32), ignoring EOS.
    Computed by transformers in every run; continuations already computed in this run (by
    this or another xdist worker: three modules ask for the same SmolLM2 ones, two for
    Gemma 3's) are read back rather than recomputed: they are the same computation.
    `load_model`: called only if something is missing, for transformers' model of this GGUF
    (hf_gguf_model's), so that a caller that holds one already (loading Gemma 3 270M's takes
    minutes) lends it; by default hf_gguf_model(gguf_path)."""
    assert num_new <= REFERENCE_NEW, f"raise REFERENCE_NEW to {num_new}"
    with _run_memo(gguf_path) as memo:
        missing = {_key(ids): ids for ids in prompts if _key(ids) not in memo}
        if missing:
            model = load_model() if load_model else hf_gguf_model(gguf_path)
            memo.update(zip(missing, _hf_greedy(model, list(missing.values()),
                                                REFERENCE_NEW)))
        return [memo[_key(ids)][:num_new] for ids in prompts]


def _key(ids: list[int]) -> str:
    return ",".join(map(str, ids))


_IN_PROCESS_MEMO: dict[str, dict[str, list[int]]] = {}


@contextmanager
def _run_memo(gguf_path: Path):
    """This test run's continuations of one file, held under a lock: in a file shared by the
    run's xdist workers (their PYTEST_XDIST_TESTRUNUID), else in this process."""
    stat = gguf_path.stat()
    name = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|"
                          f"{REFERENCE_NEW}".encode()).hexdigest()[:16]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield _IN_PROCESS_MEMO.setdefault(name, {})
        return
    folder = Path(tempfile.gettempdir()) / f"xla-inference-hf-greedy-{run}"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits rather than recomputes
        memo = json.loads(path.read_text()) if path.exists() else {}
        yield memo
        path.write_text(json.dumps(memo))


def hf_gguf_model(gguf_path: Path):
    """transformers' float32 causal LM built by its own GGUF loader (its dequantizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()


class TransformersGGUF:
    """transformers' model of one GGUF (hf_gguf_model), loaded on first use and kept until
    released: for a module whose tests need it more than once (loading parses the GGUF's
    vocabulary twice and dequantizes every tensor: half a minute for SmolLM2, minutes for
    Gemma 3 270M on CI)."""

    def __init__(self, gguf_path: Path):
        self.gguf_path = gguf_path
        self._model = None

    def get(self):
        if self._model is None:
            self._model = hf_gguf_model(self.gguf_path)
        return self._model

    def release(self) -> None:
        import gc

        self._model = None
        gc.collect()


def _hf_greedy(model, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    import torch

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


def hf_log_softmax(gguf_path: Path, sequences: list[list[int]], model=None) -> list:
    """For each sequence of token ids, the float64 log-softmax [len, V] of transformers'
    float32 logits over it (the model loaded once for all of them, or the caller's
    hf_gguf_model of this file)."""
    import numpy as np
    import torch

    model = hf_gguf_model(gguf_path) if model is None else model
    out = []
    with torch.no_grad():
        for token_ids in sequences:
            logits = model(torch.tensor([token_ids])).logits[0].numpy().astype(np.float64)
            shifted = logits - logits.max(-1, keepdims=True)
            out.append(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))
    return out
