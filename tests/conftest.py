import os

# Tests run on the CPU; keep JAX from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
