"""The HTTP API: ``create_app(config)`` builds the FastAPI application.

Routes stay thin: models validate every field before anything is written,
``control`` does the device work.  Every error, whatever produced it (our
checks, the driver's errnos, FastAPI's validation, routing), is one JSON
shape, ``ErrorBody``, and is declared per operation in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from netblk_admin import __version__, metrics
from netblk_admin.auth import TokenVerifier
from netblk_admin.config import ApiConfig
from netblk_admin.control import GOALS, Action, ApiError, DeviceControl
from netblk_admin.models import (
    DEFAULT_WAIT,
    ConfigPatchBody,
    Device,
    DeviceConfig,
    DeviceList,
    ErrorBody,
    FieldIssue,
    Health,
    QueryBoolean,
    WaitSeconds,
    sysfs_values,
)
from netblk_admin.sysfs import DeviceTree

#: The largest body read.  The largest valid one (every field, 8 IPv6
#: servers), pretty-printed, is under 2 KiB; uvicorn itself has no cap.
MAX_BODY_BYTES = 16 * 1024

DESCRIPTION = f"""\
Control of netblk.ko's devices through sysfs (`/sys/block/netblkN`).

Every endpoint but `/v1/health` needs `Authorization: Bearer <token>`.
Errors are JSON: `{{"error": "<reason>", "detail": ...}}`, plus the device's
`state` (and `last_error`) when they decided the answer.

Input is strict: a body is at most {MAX_BODY_BYTES} bytes (else 413); its
integers are JSON integers (`10910`, not `10910.0`, `"10910"` or `true`);
`wait` is `true` or `false`, `timeout` a JSON number.
"""

ERRORS = {
    400: "The body could not be read as JSON text (`bad_request`).",
    401: "No or a wrong bearer token (`unauthorized`).",
    404: "No such netblk device (`unknown_device`).",
    409: "The device's state forbids it (`busy`); no server or export set (`no_target`);"
    " a disconnect request cut the wait short (`preempted`); or the device ended in"
    " another state (`interrupted`).",
    413: f"The request body is over {MAX_BODY_BYTES} bytes (`too_large`).",
    422: "Invalid request, nothing written (`invalid_request`); or the driver refused"
    " a value (`invalid_value`).",
    502: "The connection attempt ended in state `error` (`connect_failed`; see `last_error`).",
    503: "sysfs is unreadable (`sysfs_error`) or netblk.ko is being unloaded (`unloading`).",
    504: "`wait` ran out (`timeout`); the attempt goes on.",
}
CHALLENGE = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}

BEARER = HTTPBearer(
    auto_error=False,
    description="A token from `netblk-certs token`; its hash goes into `[tokens.NAME]`.",
)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses."""
    answers: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes
    }
    if 401 in answers:
        answers[401]["headers"] = CHALLENGE
    return answers


async def _control(request: Request) -> DeviceControl:
    control: DeviceControl = request.app.state.control
    return control


async def _authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> str:
    """The name of the caller's token (for the log); 401 without a valid one."""
    if credentials is None:
        raise ApiError(
            401,
            "unauthorized",
            "send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    verifier: TokenVerifier = request.app.state.verifier
    name = await verifier.identify(credentials.credentials)
    if name is None:
        raise ApiError(
            401,
            "unauthorized",
            "the bearer token is not valid",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return name


async def _known_query(request: Request) -> None:
    """A query parameter the operation does not take is a 422, not ignored:
    ``?wiat=true`` must not quietly skip the wait."""
    route: APIRoute = request.scope["route"]
    known = {param.alias for param in route.dependant.query_params}
    unknown = [key for key in request.query_params if key not in known]
    if unknown:
        raise RequestValidationError(
            [
                {"loc": ("query", key), "msg": "unknown query parameter", "type": "extra_forbidden"}
                for key in unknown
            ]
        )


Control = Annotated[DeviceControl, Depends(_control)]
#: The token's name; FastAPI runs the check once per request however often it is named.
Caller = Annotated[str, Security(_authenticated)]
#: Authentication first, so a stranger learns nothing from a 422.
GUARDED = [Security(_authenticated), Depends(_known_query)]

public = APIRouter()
# 413 on every operation: the body cap comes before routing.
v1 = APIRouter(
    prefix="/v1", tags=["devices"], dependencies=GUARDED, responses=errors(401, 413, 422)
)


def create_app(config: ApiConfig) -> FastAPI:
    app = FastAPI(title="netblk admin API", version=__version__, description=DESCRIPTION)
    app.state.control = DeviceControl(DeviceTree(config.sysfs_root))
    app.state.verifier = TokenVerifier(config.tokens)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.include_router(public)
    app.include_router(v1)
    return app


@public.get(
    "/v1/health",
    dependencies=[Depends(_known_query)],
    responses=errors(413, 422, 503),
    tags=["health"],
)
async def health(control: Control) -> Health:
    """Whether the sysfs root is readable, and how many devices it holds."""
    return Health(status="ok", devices=await control.check_root())


@public.get(
    "/metrics",
    # A bare Response: the 200 is text (declared here), errors stay JSON.
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format 0.0.4.",
            "content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}},
        },
        **errors(401, 413, 422, 503),
    },
    dependencies=GUARDED,
    tags=["stats"],
)
async def prometheus(control: Control) -> Response:
    """Every device's stats and state in the Prometheus text format."""
    return Response(metrics.render(await control.snapshots()), media_type=metrics.CONTENT_TYPE)


@v1.get("/devices", responses=errors(503))
async def list_devices(control: Control) -> DeviceList:
    """Every netblk device: config, state, last_error and stats."""
    snapshots = await control.snapshots()
    return DeviceList(devices=[Device.from_snapshot(s) for s in snapshots])


@v1.get("/devices/{name}", responses=errors(404, 503))
async def get_device(name: str, control: Control) -> Device:
    return Device.from_snapshot(await control.snapshot(name))


@v1.get("/devices/{name}/config", responses=errors(404, 503))
async def get_config(name: str, control: Control) -> DeviceConfig:
    return Device.from_snapshot(await control.snapshot(name)).config


@v1.get("/devices/{name}/stats", responses=errors(404, 503))
async def get_stats(name: str, control: Control) -> dict[str, int]:
    """The driver's counters (kmod/README.md lists the keys)."""
    return dict((await control.snapshot(name)).stats)


@v1.patch("/devices/{name}/config", responses=errors(400, 404, 409, 503))
async def change_config(
    name: str, patch: Annotated[ConfigPatchBody, Body()], control: Control, caller: Caller
) -> Device:
    """Validate every field given, then write them in the schema's order;
    the answer is the device afterwards."""
    return Device.from_snapshot(await control.configure(name, sysfs_values(patch), caller))


def _add_action(action: Action) -> None:
    """POST /v1/devices/{name}/connect and .../disconnect: one handler, two routes."""
    goal = GOALS[action]

    async def endpoint(
        name: str,
        response: Response,
        control: Control,
        caller: Caller,
        wait: Annotated[QueryBoolean, Query(description="wait until the state settles")] = False,
        timeout: Annotated[
            WaitSeconds, Query(description="seconds to wait, with wait=true")
        ] = DEFAULT_WAIT,
    ) -> Device:
        settled, snapshot = await control.act(name, action, caller, timeout if wait else None)
        response.status_code = 200 if settled else 202
        return Device.from_snapshot(snapshot)

    codes = (404, 409, 502, 503, 504) if action == "connect" else (404, 409, 503, 504)
    v1.add_api_route(
        f"/devices/{{name}}/{action}",
        endpoint,
        methods=["POST"],
        name=f"{action}_device",
        summary=f"{action.capitalize()} the device",
        description=f"Without `wait`: 202 once the driver took the request. With `wait=true`:"
        f" 200 once the state is `{goal}`, else an error naming where it ended.",
        status_code=202,
        responses={
            200: {"model": Device, "description": f"The device is `{goal}`."},
            **errors(*codes),
        },
    )


for _action in GOALS:
    _add_action(_action)


def _error(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.to_json(), status, headers=headers)


class BodyTooLarge(HTTPException):
    """Raised by BodyLimit's ``receive``; FastAPI lets HTTPExceptions from a
    body read through to the exception handlers."""

    def __init__(self) -> None:
        super().__init__(413)


def _too_large() -> JSONResponse:
    detail = f"the request body is over {MAX_BODY_BYTES} bytes"
    # The rest of the body is never read: the connection cannot carry another request.
    return _error(413, ErrorBody(error="too_large", detail=detail), {"Connection": "close"})


class BodyLimit:
    """ASGI middleware: a body over MAX_BODY_BYTES is a 413.  A Content-Length
    over it is refused before anything else runs; a body without one (chunked)
    is counted as it arrives and cut off once past it, never buffered here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _content_length(scope) > MAX_BODY_BYTES:
            await _too_large()(scope, receive, send)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise BodyTooLarge
            return message

        await self.app(scope, counting, send)


def _content_length(scope: Scope) -> int:
    """The declared body size; 0 if none or unreadable (the count still holds)."""
    try:
        return int(Headers(scope=scope).get("content-length", "0"))
    except ValueError:
        return 0


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        body = ErrorBody(
            error=exc.error, detail=exc.detail, state=exc.state, last_error=exc.last_error
        )
        return _error(exc.status, body, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_request: Request, _exc: BodyTooLarge) -> JSONResponse:
        return _too_large()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [
            FieldIssue(loc=list(issue["loc"]), msg=issue["msg"], type=issue["type"])
            for issue in exc.errors()
        ]
        return _error(422, ErrorBody(error="invalid_request", detail=issues))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        # Routing: 404 for unknown paths, 405 (with Allow) for wrong methods.
        reason = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return _error(exc.status_code, ErrorBody(error=reason, detail=str(exc.detail)), exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette re-raises it afterwards, so uvicorn logs the traceback.
        return _error(500, ErrorBody(error="internal_error", detail="see the admin API's log"))
