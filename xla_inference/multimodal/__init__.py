"""Encoders of multimodal inputs (vision towers) as JAX programs; imports no vllm or torch."""
