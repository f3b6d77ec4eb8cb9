"""`python -m tests.e2e.isolated MODULE:FUNCTION KWARGS.json OUT.json`: FUNCTION(**KWARGS) in a
process of its own with vLLM's engine core in it (VLLM_ENABLE_V1_MULTIPROCESSING=0), its
JSON-able result written to OUT (tests/e2e/engines.in_fresh_process).

Tests that read what vLLM's scheduler kept (drafts) need the engine core in their process.
In the pytest worker they failed in a full slow run, passing alone: vLLM's engine shutdown
calls torch.accelerator.empty_cache(), which raised once an earlier module had imported
torchax in that worker (torch_models/torchax_compat.py now makes it harmless). They run
here, apart from whatever state a worker holds."""

import importlib
import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    target, kwargs, out = sys.argv[1:]
    module, name = target.split(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs))
    with open(out, "w") as f:
        json.dump(result, f)
