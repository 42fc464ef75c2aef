"""SGLang's own cache, abort and info routes on the front's port (`serve --engine sglang`),
answered by the SGLang server behind it, so clients need one address."""
from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import Response

from epic_sglang.errors import InvalidRequest
from epic_sglang.server.access import OPEN, Forbidden
from epic_sglang.server.inputs import grant_of, json_body, require_object
from epic_sglang.sglang_plugin.runtime import owner_rid

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
    """Aborts reach only the caller's own requests (SGLang knows them by `owner_rid`); an
    admin's rid goes as given, and only an admin may abort all."""
    body = require_object(await json_body(http), {"rid", "abort_all"}, "the /abort_request body")
    grant = grant_of(http)
    if body.get("abort_all") is True:
        if not grant.admin:
            raise Forbidden("abort_all needs the admin API key")
        return await _forward(http, "POST", "/abort_request", {"abort_all": True})
    if not isinstance(body.get("rid"), str):
        raise InvalidRequest("give rid (a string) or abort_all: true")
    rid = body["rid"] if grant is OPEN or grant.admin else owner_rid(grant.name, body["rid"])
    return await _forward(http, "POST", "/abort_request", {"rid": rid})


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(http: HTTPRequest) -> Response:
    return await _forward(http, "GET", "/get_model_info")


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(http: HTTPRequest) -> Response:
    return await _forward(http, "GET", "/get_server_info")
