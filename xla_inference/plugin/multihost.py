"""The multi-host executor's old place: it is distributed/multihost.py now. The README told
users to type `python -m xla_inference.plugin.multihost` (a follower on another host) and
`--distributed-executor-backend xla_inference.plugin.multihost.MultiHostExecutor`; both
keep working through this module (the platform swaps the old qualname for the new one)."""

from xla_inference.distributed.multihost import MultiHostExecutor, main  # noqa: F401

if __name__ == "__main__":
    main()
