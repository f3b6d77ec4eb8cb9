"""One engine over several JAX processes, one per host (multi-host SPMD): the executor that
drives them and the followers' loop (multihost.py, MultiHostExecutor), the same driver with
its followers as Ray actors (ray_executor.py, RayMultiHostExecutor) and their placement on a
Ray cluster (ray_hosts.py, no vLLM). An adapter like plugin/: imports vllm. The JAX side
(jax.distributed, the barrier before warm-up) is runner/jax_setup.py, which the engine
calls."""
