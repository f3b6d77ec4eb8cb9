import os

# Tests run on the CPU; keep JAX from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight virtual CPU devices (set before JAX is imported), so that tensor and expert
# parallel code runs here; single-device code uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
