"""SGLang's own cache, abort and info routes on the front's port (`serve --engine sglang`),
answered by the SGLang server behind it, so clients need one address."""
from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import Response

from epic_sglang.server.inputs import json_body

router = APIRouter()


async def _forward(http: HTTPRequest, method: str, path: str, body: dict | None = None) -> Response:
    answer = await http.app.state.engine.forward(method, path, body)
    return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(http: HTTPRequest) -> Response:
    response = await _forward(http, "POST", "/flush_cache")
    if response.status_code < 400:  # flushed: documents must be compiled again
        http.app.state.engine.compiled.clear()
    return response


@router.post("/abort_request")
async def abort_request(http: HTTPRequest) -> Response:
    body = await json_body(http)
    if not isinstance(body, dict):
        raise ValueError("the /abort_request body must be a JSON object")
    return await _forward(http, "POST", "/abort_request", body)


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(http: HTTPRequest) -> Response:
    return await _forward(http, "GET", "/get_model_info")


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(http: HTTPRequest) -> Response:
    return await _forward(http, "GET", "/get_server_info")
