"""A prefill/decode proxy in front of two (or more) OpenAI servers, in vLLM's disaggregated
flow: each completion or chat request goes first to a prefill server (kv_producer) with
max_tokens=1, no streaming and kv_transfer_params {"do_remote_decode": true}; then the
original request, with the kv_transfer_params the prefill server answered, goes to a decode
server (kv_consumer), whose answer (streamed or not) is the client's. Servers are taken in
turn when several are given.

    xla-inference disagg-proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \\
        --port 8000

The prefill server's errors (a 400 for a bad request) reach the client as they are."""

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


def build_app(prefill_urls: list[str], decode_urls: list[str], timeout_s: float = 600.0):
    app = FastAPI(title="xla-inference disaggregated proxy")
    prefills, decodes = itertools.cycle(prefill_urls), itertools.cycle(decode_urls)
    client = httpx.AsyncClient(timeout=timeout_s)

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
        prefill = await client.post(next(prefills) + route, json=prefill_body(body))
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
        decode_url = next(decodes) + route
        if not body.get("stream"):
            answer = await client.post(decode_url, json=decode_body)
            return Response(answer.content, answer.status_code,
                            media_type=answer.headers.get("content-type"))
        upstream = await client.send(client.build_request("POST", decode_url, json=decode_body),
                                     stream=True)

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
