"""Where a step's wall time goes: inside the compiled programs, or on the host around them.

Off by default (it changes timing). With XLA_INFERENCE_STEP_STATS=1 the engine waits for
each compiled program right after dispatching it and adds the time from dispatch to ready
to `device_s`; `wall_s` adds the time from one step's start to the next one's (vLLM's
scheduling, this runner's batch building, the programs, output processing). Their
difference is the host overhead. Waiting serialises host and device work, so run it in
a separate pass from throughput measurements.
"""

import dataclasses
import time

import jax

from xla_inference import envs


@dataclasses.dataclass
class StepStats:
    enabled: bool = dataclasses.field(
        default_factory=envs.step_stats_enabled)
    steps: int = 0
    wall_s: float = 0.0
    device_s: float = 0.0
    # token bucket -> [programs run, seconds]: where the device time went
    by_bucket: dict = dataclasses.field(default_factory=dict)
    _last_start: float | None = None
    _pending_device: float = 0.0  # device time of the step still running

    def step_started(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._last_start is not None:
            self.wall_s += now - self._last_start
            self.device_s += self._pending_device
            self.steps += 1
        self._last_start, self._pending_device = now, 0.0

    def idle(self) -> None:
        """Nothing scheduled: the step still open is dropped (its end is unknown)."""
        self._last_start, self._pending_device = None, 0.0

    def run(self, fn, *args, bucket=None):
        """fn(*args); when enabled, wait for the result and count the time as device time
        (also per `bucket`, when given)."""
        if not self.enabled:
            return fn(*args)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        seconds = time.perf_counter() - t0
        self._pending_device += seconds
        if bucket is not None:
            entry = self.by_bucket.setdefault(bucket, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds
        return out

    def report(self, reset: bool = True) -> dict:
        out = dict(steps=self.steps, wall_s=self.wall_s, device_s=self.device_s,
                   host_share=(1 - self.device_s / self.wall_s) if self.wall_s else None,
                   forward_by_bucket={str(k): v for k, v in sorted(self.by_bucket.items())})
        if reset:
            self.steps, self.wall_s, self.device_s, self.by_bucket = 0, 0.0, 0.0, {}
            self.idle()
        return out
