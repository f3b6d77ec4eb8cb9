"""Sampling: per-request options and the padded arrays built on the host (host.py), their
types (types.py), and the device sampler (sampler.py). Imports nothing above it."""
