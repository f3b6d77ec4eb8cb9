"""The torch path: vLLM's own PyTorch model classes, lowered to JAX through torchax, served
by the same runner as the native families (models/). It imports torch, torchax and vLLM,
so it sits above runner/ and beside plugin/, never in the core (tests/test_layering.py)."""
