"""A prefill/decode proxy in front of two (or more) OpenAI servers, in vLLM's disaggregated
flow: each completion or chat request goes first to a prefill server (kv_producer) with
max_tokens=1, no streaming and kv_transfer_params {"do_remote_decode": true}; then the
original request, with the kv_transfer_params the prefill server answered, goes to a decode
server (kv_consumer), whose answer (streamed or not) is the client's. Servers are taken in
turn when several are given.

    xla-inference disagg-proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \\
        --port 8000

The prefill server's errors (a 400 for a bad request) reach the client as they are; a decode
server's server error (its 502 quoting a failed KV fetch, kv_transfer/load_errors.py; any
other 5xx) becomes a 502 naming both servers and whether the prefill server still answers."""

from __future__ import annotations

import argparse
import itertools
import json
import logging

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

logger = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions")


def prefill_body(body: dict) -> dict:
    """The request as the prefill server gets it: one token, no stream, remote decode."""
    body = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    return body


async def decode_failure(client: httpx.AsyncClient, answer: httpx.Response, prefill_url: str,
                         decode_url: str) -> JSONResponse:
    """A decode server's server error, as a 502 naming the prefill server whose KV the
    request needed and whether it still answers, with the decode server's own message (for
    a failed KV fetch, the fetch's error: kv_transfer/load_errors.py)."""
    try:
        reason = answer.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        reason = answer.text[:200] or f"HTTP {answer.status_code}"
    try:
        health = await client.get(prefill_url + "/health", timeout=5.0)
        prefill_state = (f"the prefill server {prefill_url} is up (HTTP {health.status_code}); "
                         "the decode server's log names the KV fetch's error")
    except httpx.HTTPError as error:
        prefill_state = (f"the prefill server {prefill_url} that holds its KV does not answer "
                         f"({type(error).__name__}: {error or 'no reply'}): its pages are lost")
    message = (f"the decode server {decode_url} failed the request (HTTP {answer.status_code}: "
               f"{reason}); {prefill_state}")
    logger.error("xla-inference proxy: %s", message)
    return JSONResponse({"error": {"message": message, "type": "BadGatewayError",
                                   "code": 502}}, 502)


def build_app(prefill_urls: list[str], decode_urls: list[str], timeout_s: float = 600.0,
              transport: httpx.AsyncBaseTransport | None = None):
    app = FastAPI(title="xla-inference disaggregated proxy")
    prefills, decodes = itertools.cycle(prefill_urls), itertools.cycle(decode_urls)
    client = httpx.AsyncClient(timeout=timeout_s, transport=transport)

    @app.get("/health")
    async def health():
        return {"prefill": prefill_urls, "decode": decode_urls}

    @app.get("/v1/models")
    async def models():
        answer = await client.get(next(iter(decode_urls)) + "/v1/models")
        return Response(answer.content, answer.status_code,
                        media_type=answer.headers.get("content-type"))

    async def relay(request: Request, route: str):
        try:
            body = await request.json()
        except json.JSONDecodeError as error:
            return JSONResponse({"error": {"message": f"request body is not JSON: {error}",
                                           "type": "BadRequestError", "code": 400}}, 400)
        prefill_url = next(prefills)
        prefill = await client.post(prefill_url + route, json=prefill_body(body))
        if prefill.status_code != 200:
            return Response(prefill.content, prefill.status_code,
                            media_type=prefill.headers.get("content-type"))
        params = prefill.json().get("kv_transfer_params")
        if not params:
            return JSONResponse({"error": {
                "message": "the prefill server answered no kv_transfer_params: is it started "
                           "with --kv-transfer-config naming XlaNetworkConnector, kv_producer?",
                "type": "BadGatewayError", "code": 502}}, 502)
        decode_body = dict(body, kv_transfer_params=params)
        decode_server = next(decodes)
        decode_url = decode_server + route
        if not body.get("stream"):
            answer = await client.post(decode_url, json=decode_body)
            if answer.status_code >= 500:
                return await decode_failure(client, answer, prefill_url, decode_server)
            return Response(answer.content, answer.status_code,
                            media_type=answer.headers.get("content-type"))
        upstream = await client.send(client.build_request("POST", decode_url, json=decode_body),
                                     stream=True)
        if upstream.status_code >= 500:
            await upstream.aread()
            await upstream.aclose()
            return await decode_failure(client, upstream, prefill_url, decode_server)

        async def chunks():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(chunks(), upstream.status_code,
                                 media_type=upstream.headers.get("content-type"))

    def endpoint(route: str):
        async def serve(request: Request):
            return await relay(request, route)
        return serve

    for route in ROUTES:
        app.add_api_route(route, endpoint(route), methods=["POST"])
    app.router.on_shutdown.append(client.aclose)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xla-inference disagg-proxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", action="append", required=True,
                        help="a prefill server's URL (repeat for several)")
    parser.add_argument("--decode", action="append", required=True,
                        help="a decode server's URL (repeat for several)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    ns = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(build_app([u.rstrip("/") for u in ns.prefill],
                          [u.rstrip("/") for u in ns.decode]),
                host=ns.host, port=ns.port, log_level="warning")


if __name__ == "__main__":
    main()
