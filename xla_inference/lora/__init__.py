"""Multi-LoRA serving: PEFT adapters read to host arrays (peft.py) and kept in stacked
per-slot device arrays that every projection of a step adds its delta from (slots.py)."""
