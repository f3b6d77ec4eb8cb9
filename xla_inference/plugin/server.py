"""vLLM's OpenAI server as `xla-inference serve` runs it: vLLM's own server, three changes.

1. SIGTERM (or SIGINT) drains: vLLM's `--shutdown-timeout` defaults to 0, which stops the
   engine at once and leaves streaming clients waiting for a final chunk that never comes
   (the server then waits for them to hang up). Here it defaults to DRAIN_TIMEOUT_S:
   running and queued requests finish for up to that long, requests that arrive meanwhile
   get 503, and whatever is still open then ends with finish reason "abort" (a last chunk
   and `[DONE]`); then the process exits. `--shutdown-timeout N` (0 included) wins; a
   second signal (Ctrl-C twice) aborts what is still running at once.
2. `--api-key` (or VLLM_API_KEY) guards every route but `/health`. vLLM's own check covers
   only paths under /v1, /v2, /inference and /cohere, and leaves /tokenize, /detokenize,
   /invocations, /metrics, /version, /pooling, /score and the rest open.
3. With --kv-transfer-config, a request whose KV could not be fetched from its prefill
   server fails with a 502 quoting the fetch's error (kv_transfer/load_errors.py) instead
   of vLLM's bare 500 "Internal server error".

Run as `python -m xla_inference.plugin.server [vLLM server flags]`; cli.py does. It imports
vLLM's front-end only: the engine core (a forked child, see cli.py) is what imports JAX.
"""

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
from argparse import Namespace

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from vllm import envs
from vllm.entrypoints.launchers.api_server import entry
from vllm.logger import init_logger

# Under "vllm.", so that vLLM's logging setup (handlers, format, level) shows it.
logger = init_logger(f"vllm.{__name__}")

# Long enough for a typical completion to finish; short enough that, within Kubernetes'
# default grace period (SIGKILL 30 s after SIGTERM), what is left still ends cleanly and
# the engine core is torn down.
DRAIN_TIMEOUT_S = 25
# The one route a load balancer or liveness probe calls without credentials.
OPEN_PATHS = frozenset({"/health"})


class Drain:
    """Set once shutdown has begun; from then on the guard turns new requests away."""

    def __init__(self) -> None:
        self.started = False


class Guard:
    """ASGI middleware, outermost: 503 for requests that arrive while the server drains;
    401 for any path but OPEN_PATHS without `Authorization: Bearer <one of the keys>`."""

    def __init__(self, app: ASGIApp, keys: list[str], drain: Drain) -> None:
        self.app = app
        # Compare digests, in constant time, so neither a key's length nor its prefix leaks.
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.drain = drain

    def authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        # No early exit: every key is compared whatever matches.
        return sum(secrets.compare_digest(digest, d) for d in self.key_digests) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan events
            await self.app(scope, receive, send)
            return
        if self.drain.started:
            refusal = JSONResponse({"error": "server shutting down"}, status_code=503,
                                   headers={"Connection": "close", "Retry-After": "1"})
            await refusal(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        # A CORS preflight carries no credentials by design; CORSMiddleware answers it.
        guarded = self.key_digests and path not in OPEN_PATHS and scope.get("method") != "OPTIONS"
        if guarded and not self.authorized(Headers(scope=scope)):
            await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def api_keys(args: Namespace) -> list[str]:
    """The keys vLLM would use: `--api-key` (repeatable) first, else VLLM_API_KEY."""
    return [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]


_vllm_build_app = entry.build_app
_vllm_serve_http = entry.serve_http


def build_app(args: Namespace, *a, **kw):
    """vLLM's app, with the Guard outside every middleware vLLM or the user added."""
    app = _vllm_build_app(args, *a, **kw)
    app.state.xla_drain = Drain()
    # vLLM's SageMaker bootstrap has already built the middleware stack, so add_middleware
    # would refuse; the stack is a function of user_middleware (first = outermost) and is
    # rebuilt from it, as that bootstrap does itself.
    app.user_middleware.insert(0, Middleware(Guard, keys=api_keys(args), drain=app.state.xla_drain))
    app.middleware_stack = app.build_middleware_stack()
    return app


async def serve_http(app, *a, **kw):
    """vLLM's serve_http, told when shutdown begins and ends.

    vLLM's SIGTERM/SIGINT handler calls `engine_client.shutdown(timeout=shutdown_timeout)`
    in a worker thread (it drains the engine core when the timeout is positive, then stops
    it) and only then stops the HTTP server, which keeps accepting connections meanwhile and
    waits for every open response to end. There is no public hook, so the engine client's
    shutdown is wrapped (watch_shutdown).
    """
    if app.state.engine_client is not None:
        watch_shutdown(app.state.engine_client, app.state.xla_drain, asyncio.get_running_loop())
        if getattr(app.state.args, "kv_transfer_config", None) is not None:
            from xla_inference.kv_transfer.load_errors import report_kv_load_errors

            report_kv_load_errors(app.state.engine_client)
    return await _vllm_serve_http(app, *a, **kw)


def watch_shutdown(engine_client, drain: Drain, loop: asyncio.AbstractEventLoop) -> None:
    """Wrap the engine client's shutdown: before it runs, mark the drain (the guard turns
    new requests away) and let a second signal cut it short; after it, end every request
    the engine core did not finish (past the timeout, or with a timeout of 0), which vLLM
    would leave waiting for an output that never comes."""
    vllm_shutdown = engine_client.shutdown

    def shutdown(*args, **kwargs):
        first = not drain.started  # vLLM calls it again when its engine context exits
        if first:
            # Before the guard refuses anything: once a client sees a 503, a second signal
            # is handled.
            _on_loop(loop, arm_second_signal, engine_client, loop)
        drain.started = True
        try:
            return vllm_shutdown(*args, **kwargs)
        finally:
            if first:
                _on_loop(loop, end_open_requests, engine_client)

    engine_client.shutdown = shutdown


def _on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn on the event loop's thread, which owns the output processor and signals."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to end
        loop.call_soon_threadsafe(fn, *args)


def arm_second_signal(engine_client, loop: asyncio.AbstractEventLoop) -> None:
    """A second SIGINT or SIGTERM (vLLM's handler ignores repeats) aborts every request
    still running, so that a second Ctrl-C ends the drain at once."""

    async def abort_all() -> None:
        ids = list(engine_client.output_processor.request_states)
        if not ids:
            return
        logger.info("[shutdown] xla-inference: second signal, aborting %d request(s)", len(ids))
        try:
            await engine_client.abort(ids, internal=True)
        except Exception:  # the engine core is already gone: end_open_requests follows
            logger.debug("abort during shutdown failed", exc_info=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: loop.create_task(abort_all()))


def end_open_requests(engine_client) -> None:
    """Give every request still open a final output (finish reason "abort"), so its
    stream sends its last chunk, if any, and `[DONE]`, and its connection closes."""
    processor = engine_client.output_processor
    if processor.request_states:
        logger.info("[shutdown] xla-inference: ending %d request(s) the engine did not "
                    "finish", len(processor.request_states))
        processor.abort_requests(list(processor.request_states), internal=True)


def forget_parent_wakeup_fd() -> None:
    """In a child forked from this process (the engine core, see cli.py): stop writing
    received signals to this process's event loop. The child inherits the loop's signal
    wakeup fd, so the SIGTERM that stops the engine core would reach this loop too, where
    it would read as a second signal."""
    with contextlib.suppress(ValueError):  # forked from a thread other than the main one
        signal.set_wakeup_fd(-1)


def main() -> None:
    """vLLM's api_server main (argument parsing, logging, one API server process) with the
    drain default and the patched app builder and HTTP server."""
    import uvloop
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(
        description="vLLM's OpenAI-compatible server on xla-inference."))
    # A default, not an inserted flag: the user's `--shutdown-timeout`, on the command line
    # or in a `--config` file, overrides it.
    parser.set_defaults(shutdown_timeout=DRAIN_TIMEOUT_S)
    args = parser.parse_args()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    # build_and_serve looks both names up in its module when it runs.
    entry.build_app, entry.serve_http = build_app, serve_http
    os.register_at_fork(after_in_child=forget_parent_wakeup_fd)
    uvloop.run(entry.run_server(args))


if __name__ == "__main__":
    main()
