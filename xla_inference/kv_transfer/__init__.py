"""KV transfer between engines through vLLM's KV connectors (prefill/decode
disaggregation): the connectors served (config.py), our shared-storage connector
(shared_storage.py, storage.py) and its worker side around the runner's steps (steps.py).
An adapter like plugin/: imports vllm."""
