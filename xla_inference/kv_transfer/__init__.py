"""KV transfer between engines through vLLM's KV connectors (prefill/decode
disaggregation): the connectors served (config.py); our shared-storage connector
(shared_storage.py, storage.py); our network connector (network.py, its wire format wire.py)
and the proxy in front of a prefill and a decode server (proxy.py); the worker side around
the runner's steps (steps.py). An adapter like plugin/: imports vllm."""
