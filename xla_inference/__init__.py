"""xla-inference: a vLLM platform plugin that runs models as JAX/XLA programs."""

__version__ = "0.1.0"
