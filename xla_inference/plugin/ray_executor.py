"""The Ray executor's old place: it is distributed/ray_executor.py now. The README told
users that the qualname `xla_inference.plugin.ray_executor.RayMultiHostExecutor` selects it;
that keeps working through this module (the platform swaps it for the new one)."""

from xla_inference.distributed.ray_executor import RayMultiHostExecutor  # noqa: F401
