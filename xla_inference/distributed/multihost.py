"""Multi-host SPMD: one engine over several JAX processes (one per host), joined by
jax.distributed, the mesh spanning every process's devices.

Process 0, the driver, is vLLM's engine core: its scheduler decides every step, and this
executor (`--distributed-executor-backend xla_inference.distributed.multihost.MultiHostExecutor`,
or XLA_INFERENCE_HOSTS > 1, which selects it) sends each call it makes on its worker, the
step's SchedulerOutput and GrammarOutput included, to the followers before making it
itself. Each follower holds the same worker (plugin/worker.py) and makes the same call, so
every process builds the same host-side step arrays and runs the same jitted step on its
own devices' shards; only the driver's results go back to vLLM. Per step that is one
message per follower of the scheduler's compact output (token ids of new requests, counts
and block ids of running ones), never per layer; the step's activations move only inside
XLA's collectives (gloo over TCP on the CPU). Weights: each process reads the checkpoint
and places only its own devices' shards (parallel/sharding.py builds every array with
jax.make_array_from_callback).

Followers start on this machine (XLA_INFERENCE_FOLLOWERS=local: the executor spawns them)
or on other hosts (external: `python -m xla_inference.distributed.multihost --coordinator
HOST:PORT --process-id I` on each, with XLA_INFERENCE_MULTIHOST_KEY). A follower that
never joins fails start-up within XLA_INFERENCE_JOIN_TIMEOUT, naming it; one that dies or
fails while serving makes the driver log which and exit at once (its steps could never
finish: the mesh spans the dead process's devices), and the followers left exit when the
driver's connection closes.

A call other than the step's own (add_lora, collective_rpc from a client, ...) may fail
without harm, as it does on one host (vLLM answers its caller and serves on): each
follower answers such a call with its outcome, and the driver waits for the answers. The
same failure everywhere is the caller's error, raised to vLLM as the driver's; a call that
fails on some processes only has left them different, and ends the engine.
"""

import argparse
import logging
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge

import cloudpickle
from vllm.v1.executor.uniproc_executor import UniProcExecutor
from vllm.v1.outputs import AsyncModelRunnerOutput
from vllm.v1.serial_utils import run_method
from vllm.v1.worker.worker_base import WorkerWrapperBase

from xla_inference import envs

logger = logging.getLogger(__name__)

EXECUTOR = "xla_inference.distributed.multihost.MultiHostExecutor"
_STOP = "stop"
_CALL = "call"
_DONE = "done"  # a follower's outcome of a call outside the step: (_DONE, traceback or None)
# The calls every step makes: no outcome is sent back (a failure in them ends the engine).
_STEP_METHODS = frozenset({"execute_model", "sample_tokens", "take_draft_token_ids"})
# After a follower fails, how long the engine core gets to stop through vLLM's path.
_FAILURE_GRACE_S = 10.0
# How long shutdown lets a gone follower's watcher name it with its own reason.
_WATCHER_WAIT_S = 1.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def _free_port_pair(host: str) -> int:
    """A port p with p and p + 1 free (jax.distributed's coordinator, our control channel)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as s1, socket.socket() as s2:
                s1.bind((host, port))
                s2.bind((host, port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no two consecutive free ports on {host}")


class FollowerGroup:
    """The driver's side of the control channel: the followers' connections, the local
    followers' processes, and a watcher per follower that ends the driver when one goes."""

    def __init__(self, num_hosts: int, control: tuple[str, int], key: bytes):
        self.num_hosts = num_hosts
        self.key = key
        self.connections: dict[int, Connection] = {}
        self.processes: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.failure: str | None = None  # why the group failed, once a follower went
        self.failure_callback = None  # vLLM's (the engine core's), told of a failure
        self.outcomes: dict[int, queue.Queue] = {}  # per follower: its calls' outcomes
        # The per-step message (execute_model's SchedulerOutput), for the log at shutdown.
        self.steps, self.step_bytes, self.step_seconds = 0, 0, 0.0
        self._server = socket.create_server(control, reuse_port=False)
        self._server.settimeout(1.0)

    def spawn_local(self, control: str) -> None:
        """Start processes 1..N-1 on this machine, each told the control address and its id
        (the key travels in the environment, not on the command line)."""
        env = {**os.environ, "XLA_INFERENCE_MULTIHOST_KEY": self.key.decode()}
        for pid in range(1, self.num_hosts):
            self.processes[pid] = subprocess.Popen(
                [sys.executable, "-m", "xla_inference.distributed.multihost", "--control",
                 control, "--process-id", str(pid)], env=env)

    def accept_all(self, timeout_s: float) -> None:
        """Wait for every follower to connect and say its id; a local follower that exits
        first, or any still missing at the deadline, fails start-up naming it."""
        deadline = time.monotonic() + timeout_s
        while len(self.connections) < self.num_hosts - 1:
            self._check_unjoined()
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.num_hosts)) - set(self.connections))
                raise RuntimeError(
                    f"xla-inference multi-host: follower process(es) {missing} did not join the "
                    f"driver within {timeout_s:.0f}s (XLA_INFERENCE_JOIN_TIMEOUT); "
                    f"{self._where(missing)}")
            try:
                sock, peer = self._server.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            conn = Connection(sock.detach())
            deliver_challenge(conn, self.key)
            answer_challenge(conn, self.key)
            pid = conn.recv()
            if not isinstance(pid, int) or not 0 < pid < self.num_hosts or pid in self.connections:
                conn.close()
                raise RuntimeError(f"xla-inference multi-host: a follower from {peer} said it is "
                                   f"process {pid!r}; expected one of 1..{self.num_hosts - 1}, "
                                   "each once")
            self.connections[pid] = conn
            self.outcomes[pid] = queue.Queue()
            logger.info("xla-inference multi-host: follower process %d joined from %s", pid, peer)
        self._server.close()

    def _check_unjoined(self) -> None:
        """Fail start-up at once when a follower that has not joined yet has exited."""
        for pid, proc in self.processes.items():
            if proc.poll() is not None and pid not in self.connections:
                raise RuntimeError(f"xla-inference multi-host: follower process {pid} (local pid "
                                   f"{proc.pid}) exited with code {proc.returncode} before "
                                   "joining the driver")

    def _where(self, pids) -> str:
        local = [f"process {p}: local pid {self.processes[p].pid}" for p in pids
                 if p in self.processes]
        return ("; ".join(local) if local else
                "start them with `python -m xla_inference.distributed.multihost --coordinator "
                "HOST:PORT --process-id I` on their hosts")

    def broadcast(self, message) -> None:
        start = time.perf_counter()
        payload = cloudpickle.dumps(message)
        for pid, conn in self.connections.items():
            try:
                conn.send_bytes(payload)
            except OSError as exc:
                self.fail(pid, f"cannot be reached ({exc})")
        if message[0] == _CALL and message[1] == "execute_model":
            self.steps += 1
            self.step_bytes += len(payload)
            self.step_seconds += time.perf_counter() - start

    def watch(self) -> None:
        """One daemon thread per follower, blocked on its connection: a follower only ever
        writes to say it failed, and its socket closes when it dies."""
        for pid, conn in self.connections.items():
            threading.Thread(target=self._watch_one, args=(pid, conn), daemon=True,
                             name=f"xla-follower-{pid}").start()

    def _watch_one(self, pid: int, conn: Connection) -> None:
        try:
            while True:
                message = conn.recv()
                if not (isinstance(message, tuple) and message[0] == _DONE):
                    reason = f"failed:\n{message}"
                    break
                self.outcomes[pid].put(message[1])
        except (EOFError, OSError):
            reason = "closed its connection (the process died or was killed)"
        if not self.stopping:
            self.fail(pid, reason)

    def outcomes_of_call(self) -> dict[int, str]:
        """Each follower's outcome of the call just made (waiting for the slower ones):
        {follower: traceback} for those it failed on."""
        failed = {}
        for pid, outcomes in self.outcomes.items():
            while True:
                if self.failure is not None:
                    raise RuntimeError(self.failure)
                try:
                    outcome = outcomes.get(timeout=1.0)
                    break
                except queue.Empty:
                    continue
            if outcome is not None:
                failed[pid] = outcome
        return failed

    def fail(self, pid: int, reason: str) -> None:
        """The mesh spans this follower's devices: no step can finish without it. Say which
        process went, end the local followers, and fail the executor through vLLM's own
        path (the engine core raises, tells the front-end it is dead, and exits); a step
        stuck in a collective with the dead process past the grace period ends the engine
        core outright."""
        if self.failure is not None:
            return
        self.failure = (f"xla-inference multi-host: follower process {pid}{self._describe(pid)} "
                        f"{reason}; the engine cannot run without it and stops")
        logger.error(self.failure)
        print(self.failure, file=sys.stderr, flush=True)
        self._kill_followers()
        threading.Thread(target=self._exit_after_grace, daemon=True).start()
        if self.failure_callback is not None:
            self.failure_callback()

    def _describe(self, pid: int) -> str:
        proc = self.processes.get(pid)
        return f" (local pid {proc.pid})" if proc else ""

    def _kill_followers(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.kill()

    def _exit_after_grace(self) -> None:
        """A step waiting in a collective on the dead process never returns (gloo has no
        timeout we can set), so vLLM's path cannot run: tell the front-end the engine is
        dead as the engine core itself would, then exit. Without that message vLLM's
        LLM class would wait for outputs forever (its client only notices the exit)."""
        time.sleep(_FAILURE_GRACE_S)
        print(f"xla-inference multi-host: the engine core did not stop within "
              f"{_FAILURE_GRACE_S:.0f}s of losing a follower; exiting", file=sys.stderr, flush=True)
        engine_core = _engine_core_of(self.failure_callback)
        try:
            if engine_core is not None:
                engine_core._send_engine_dead()
        finally:  # during start-up it has no output thread yet: vLLM sees the exit
            os._exit(1)

    def dead(self) -> list[int]:
        return [pid for pid, proc in self.processes.items() if proc.poll() is not None]

    def lost_before_stop(self, wait_s: float = 2.0, after_error: bool = False) -> bool:
        """At shutdown, before the followers are told to stop: whether one had already
        failed or gone. A step whose collectives lost it can end the engine before that
        follower's watcher has run (data parallel steps fail at once rather than wait);
        its watcher, or else this, names it as when it dies mid-serving. `after_error`:
        the engine core stops on an error, so a follower's loss is likely but may not show
        yet (a killed Ray actor's socket can close after its collectives already failed):
        wait up to `wait_s` for it rather than answer at once."""
        gone: list[int] = []
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            # A follower writes only to say it failed; a gone one's connection reads EOF.
            gone = self.dead() or [pid for pid, conn in self.connections.items() if conn.poll(0)]
            if not gone and not after_error:
                return False
            if gone:  # its watcher may yet name it with its own reason: a short wait
                deadline = min(deadline, time.monotonic() + _WATCHER_WAIT_S)
                time.sleep(0.05)
                continue
            time.sleep(0.1)
        if self.failure is None and not gone:
            return False
        if self.failure is None:
            self.fail(gone[0], "closed its connection (the process died or was killed)")
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Wait for the followers (told to stop) to exit; kill the local ones that do not."""
        for proc in self.processes.values():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        for conn in self.connections.values():
            conn.close()


def _engine_core_of(failure_callback):
    """vLLM's EngineCoreProc, which registered `failure_callback` (a closure over it), or
    None: vLLM 0.32 gives an executor no other handle on it."""
    for cell in getattr(failure_callback, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "_send_engine_dead"):
            return cell.cell_contents
    return None


class MultiHostExecutor(UniProcExecutor):
    """vLLM's single-worker executor, made the driver of XLA_INFERENCE_HOSTS JAX processes:
    every call on the worker goes to the followers first (they make it and discard what it
    returns), then runs here."""

    def _init_executor(self) -> None:
        num_hosts = envs.num_hosts()
        if num_hosts < 2:
            raise ValueError(f"{type(self).__name__} drives several JAX processes: set "
                             "XLA_INFERENCE_HOSTS to their number (2 or more)")
        self.followers, address = self._launch_followers(num_hosts)
        self.followers.accept_all(envs.join_timeout())
        self.followers.broadcast(("init", dict(vllm_config=self.vllm_config, num_hosts=num_hosts,
                                               coordinator=address)))
        self.followers.watch()
        self.driver_worker = WorkerWrapperBase(rpc_rank=0)
        self.driver_worker.init_worker(all_kwargs=[dict(
            vllm_config=self.vllm_config, local_rank=0, rank=0,
            distributed_init_method="", is_driver_worker=True)])
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")

    def _launch_followers(self, num_hosts: int) -> tuple[FollowerGroup, str]:
        """Start (local) or await (external) processes 1..N-1: their group, not yet joined,
        and jax.distributed's coordinator address (this process, the driver, is 0)."""
        address = envs.coordinator() or f"127.0.0.1:{_free_port_pair('127.0.0.1')}"
        host, port = split_address(address)
        launch = envs.followers_launch()
        key = envs.multihost_key()
        if launch == "external" and not key:
            raise ValueError("XLA_INFERENCE_FOLLOWERS=external needs XLA_INFERENCE_MULTIHOST_KEY "
                             "set, the same on every host")
        os.environ.update(XLA_INFERENCE_COORDINATOR=address, XLA_INFERENCE_PROCESS_ID="0")
        followers = FollowerGroup(num_hosts, ("" if launch == "external" else host, port + 1),
                                  (key or secrets.token_hex(16)).encode())
        if launch == "local":
            followers.spawn_local(f"{host}:{port + 1}")
        logger.info("xla-inference multi-host: driver of %d JAX processes, coordinator %s, "
                    "followers %s", num_hosts, address, launch)
        return followers, address

    def register_failure_callback(self, callback) -> None:
        self.followers.failure_callback = callback
        if self.followers.failure is not None:
            callback()

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False,
                       single_value=False):
        if self.followers.failure is not None:
            raise RuntimeError(self.followers.failure)
        self.followers.broadcast((_CALL, method, args, kwargs or {}))
        if _method_name(method) in _STEP_METHODS:
            return super().collective_rpc(method, timeout, args, kwargs, non_block, single_value)
        try:
            result = super().collective_rpc(method, timeout, args, kwargs, non_block,
                                            single_value)
        except Exception as error:
            self._compare_outcomes(method, error)
            raise
        self._compare_outcomes(method, None)
        return result

    def _compare_outcomes(self, method, error: Exception | None) -> None:
        """A call that failed on every process failed for its caller alone; one that failed
        on some only has left the processes different: the engine ends."""
        failed = self.followers.outcomes_of_call()
        if error is not None and len(failed) == len(self.followers.connections):
            return
        if failed or error is not None:
            if failed:
                pid = next(iter(failed))
                reason = f"failed {_method_name(method)} where the driver did not:\n{failed[pid]}"
            else:
                pid = next(iter(self.followers.connections))
                reason = (f"did not fail {_method_name(method)}, which failed on the driver "
                          f"({error!r})")
            self.followers.fail(pid, reason)
            raise RuntimeError(self.followers.failure)

    def check_health(self) -> None:
        if self.followers.failure is not None:
            raise RuntimeError(self.followers.failure)
        dead = self.followers.dead()
        if dead:
            raise RuntimeError(f"xla-inference multi-host: follower process(es) {dead} exited")

    def shutdown(self) -> None:
        followers = getattr(self, "followers", None)
        if followers is None or followers.stopping or followers.failure is not None:
            return super().shutdown()  # after a failure: the grace timer ends the process
        if followers.lost_before_stop(wait_s=_FAILURE_GRACE_S if self._engine_failed() else 2.0,
                                      after_error=self._engine_failed()):
            return super().shutdown()  # failed: the grace timer ends the process
        followers.stopping = True
        if followers.steps:
            _log_and_print("xla-inference multi-host: %d steps sent to %d followers, %.0f bytes and "
                        "%.0f us of pickling and sending per step on average", followers.steps,
                        len(followers.connections), followers.step_bytes / followers.steps,
                        1e6 * followers.step_seconds / followers.steps)
        followers.broadcast((_STOP,))
        super().shutdown()
        _leave_jax_distributed()  # its shutdown is a barrier the followers meet at their exit
        followers.stop()

    def _engine_failed(self) -> bool:
        """Whether vLLM's engine core is stopping on an error rather than on request (a
        requested stop, by signal or by the client, moves it off RUNNING first)."""
        engine_core = _engine_core_of(self.followers.failure_callback)
        state = getattr(engine_core, "shutdown_state", None)
        return state is not None and int(state) == 0  # EngineShutdownState.RUNNING

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True


def _log_and_print(message: str, *args) -> None:
    """Logged, and printed to stderr: at shutdown vLLM's log handlers may be gone."""
    logger.info(message, *args)
    print(message % args, file=sys.stderr, flush=True)


def _leave_jax_distributed() -> None:
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# -- the follower ---------------------------------------------------------------------------

def _connect(control: str, process_id: int, key: bytes, timeout_s: float) -> Connection:
    """The driver's control channel; the driver may still be starting, so retry until the
    join timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = Client(split_address(control), authkey=key)
            conn.send(process_id)
            return conn
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"xla-inference multi-host: process {process_id} could not "
                                   f"reach the driver at {control} within {timeout_s:.0f}s")
            time.sleep(0.5)


def _read_messages(conn: Connection, inbox: queue.Queue) -> None:
    """The driver's messages, in order; when its connection closes (the driver exited or
    died), this follower exits too, even if a step it runs is waiting in a collective."""
    try:
        while True:
            inbox.put(cloudpickle.loads(conn.recv_bytes()))
    except (EOFError, OSError):
        print("xla-inference multi-host: the driver closed the control channel; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)


def _method_name(method) -> str:
    return method if isinstance(method, str) else method.__name__


def follow(control: str, process_id: int, key: bytes) -> None:
    """Serve as process `process_id`: build the driver's worker, then make every call the
    driver makes, in its order."""
    conn = _connect(control, process_id, key, envs.join_timeout())
    kind, init = cloudpickle.loads(conn.recv_bytes())
    assert kind == "init", kind
    os.environ.update(XLA_INFERENCE_HOSTS=str(init["num_hosts"]),
                      XLA_INFERENCE_COORDINATOR=init["coordinator"],
                      XLA_INFERENCE_PROCESS_ID=str(process_id))
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read_messages, args=(conn, inbox), daemon=True).start()
    worker = WorkerWrapperBase(rpc_rank=0)
    worker.init_worker(all_kwargs=[dict(vllm_config=init["vllm_config"], local_rank=0,
                                        rank=process_id, distributed_init_method="",
                                        is_driver_worker=False)])
    while True:
        message = inbox.get()
        if message[0] == _STOP:
            worker.shutdown()
            _leave_jax_distributed()
            conn.close()
            return
        _, method, args, kwargs = message
        in_step = _method_name(method) in _STEP_METHODS
        try:
            result = run_method(worker, method, args, kwargs)
            if isinstance(result, AsyncModelRunnerOutput):
                result.get_output()  # the same host-side state as the driver's after it
        except Exception:
            if in_step:
                conn.send(f"in {_method_name(method)}: {traceback.format_exc()}")
                raise
            conn.send((_DONE, traceback.format_exc()))  # the driver weighs it against its own
            continue
        except BaseException:
            conn.send(f"in {_method_name(method)}: {traceback.format_exc()}")
            raise
        if not in_step:
            conn.send((_DONE, None))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="An xla-inference multi-host follower: joins the driver (the vLLM engine "
                    "core started with XLA_INFERENCE_HOSTS=N) as one of its JAX processes.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--coordinator", help="the driver's XLA_INFERENCE_COORDINATOR, HOST:PORT "
                       "(its control channel is PORT+1)")
    where.add_argument("--control", help="the control channel's HOST:PORT itself")
    parser.add_argument("--process-id", type=int, required=True, help="1..N-1, once each")
    ns = parser.parse_args(argv)
    key = envs.multihost_key()
    if not key:
        parser.error("set XLA_INFERENCE_MULTIHOST_KEY to the driver's")
    control = ns.control
    if control is None:
        host, port = split_address(ns.coordinator)
        control = f"{host}:{port + 1}"
    logging.basicConfig(level=logging.INFO)
    follow(control, ns.process_id, key.encode())


if __name__ == "__main__":
    main()
