"""Validates MagicFusion's raw API arguments before the WebUI reshapes them.

The WebUI copies ``min(len(args), n)`` of ``alwayson_scripts.MagicFusion.args`` into the
script's slots and fills the rest with the UI's defaults, and it ignores a MagicFusion entry
that is not an object or has no ``args``. So too few or too many positional values, a
misspelt key or an entry of the wrong type would reach the script as a valid-looking (often
disabled) request and come back as a 200 with an unfused image. This ASGI middleware reads
the JSON body of ``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` first and answers 422 in the
WebUI's own error format, naming MagicFusion and the field. Anything else, and every valid
body, is handed to the app unchanged (the body is replayed byte for byte).

It sits innermost, inside the WebUI's CORS, gzip and error-handling middleware, and it
judges a request only once --api-auth would let it through: an unauthenticated request goes
on to the app, which answers 401 as usual.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from ..params import MagicFusionError, flat_names, unit_flat_name

GUARDED_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
SCRIPT_NAME = "magicfusion"  # the WebUI matches alwayson script names by lower-cased title


class _NoOverrides:
    """A stand-in for `p` when parsing: a raw request carries no XYZ overrides."""


def validate_payload(payload: Any) -> None:
    """Raise MagicFusionError for a malformed MagicFusion entry in a txt2img/img2img body."""
    if not isinstance(payload, dict):
        return  # not ours to judge: the WebUI answers 422 itself
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return
    for name, entry in scripts.items():
        if isinstance(name, str) and name.lower() == SCRIPT_NAME:
            validate_entry(entry)


def validate_entry(entry: Any) -> None:
    if not isinstance(entry, dict):
        raise MagicFusionError(f"alwayson_scripts.MagicFusion must be an object like {{\"args\": [...]}}, "
                               f"got {type(entry).__name__}", "args")
    unknown = [key for key in entry if key != "args"]
    if unknown:
        raise MagicFusionError(f"unknown key(s) {', '.join(map(repr, unknown))} in alwayson_scripts.MagicFusion; "
                               "only \"args\" is accepted", str(unknown[0]))
    if "args" not in entry:
        return  # the WebUI runs the script with its defaults: disabled
    args = entry["args"]
    if not isinstance(args, list):
        raise MagicFusionError(f"must be a list (one object of named fields, or the {len(flat_names(1))} or more positional "
                               f"values of GET /sdapi/v1/script-info), got {type(args).__name__}", "args")
    if not args:
        return  # no values: the script's defaults (disabled), as the WebUI documents
    if isinstance(args[0], dict) and len(args) != 1:
        raise MagicFusionError(f"the named form is exactly one object of named fields, got {len(args)} values", "args")
    # Imported here: the WebUI's modules are importable once the app runs. The script's own
    # parse checks the positional form's length and every value.
    from . import checkpoints, extension
    params = extension.parse(_NoOverrides(), args)
    if params.enabled:
        for i in params.active_units:
            checkpoints.resolve(params.units[i].checkpoint, unit_flat_name(i, "checkpoint"))


def _may_name_script(body: bytes) -> bool:
    """Whether a JSON body may hold a key spelling MagicFusion (case-insensitively; an escaped
    letter such as \u0046 counts as maybe)."""
    lowered = body.lower()
    return SCRIPT_NAME.encode() in lowered or b"\\u" in lowered


def _authorized(headers: dict[bytes, bytes]) -> bool:
    """Whether --api-auth (if set) would accept this request; the same rule as the routes."""
    from . import api
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    user = password = None
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user = password = None
    return api.credentials_ok(user, password)


def error_body(e: MagicFusionError) -> bytes:
    """The WebUI's API error format (modules/api/api.py handle_exception), plus the field."""
    return json.dumps({"error": type(e).__name__, "detail": str(e), "body": "", "errors": str(e),
                       "field": e.field}).encode()


class MagicFusionGuard:
    """Pure ASGI middleware (no BaseHTTPMiddleware: the body is read once and replayed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                not scope.get("path", "").rstrip("/").endswith(GUARDED_PATHS):
            await self.app(scope, receive, send)
            return
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m.get("type") == "http.request")
        # A body that does not name the script (any JSON spelling of it contains these letters,
        # unless escaped as \uXXXX) is not parsed at all.
        error = await run_in_threadpool(self._check, scope, body) if _may_name_script(body) else None
        if error is not None:
            body = error_body(error)
            await send({"type": "http.response.start", "status": error.status_code,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        pending = list(messages)

        async def replay():
            if pending:
                return pending.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _check(scope, body: bytes) -> MagicFusionError | None:
        try:
            headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
            if not _authorized(headers):
                return None  # the app answers 401
            try:
                payload = json.loads(body)  # the same parser the WebUI uses (it accepts NaN and Infinity)
            except (ValueError, UnicodeDecodeError):
                return None  # the app answers with its own 422
            validate_payload(payload)
        except MagicFusionError as e:
            return e
        except Exception as e:  # noqa: BLE001 - never break a request on a bug here; the script checks again
            print(f"[MagicFusion] request guard skipped: {type(e).__name__}: {e}")
        return None


def install(app) -> None:
    """Add the guard innermost, once per app (Reload UI builds a new app and calls this again)."""
    if app is None or any(getattr(m.cls, "__name__", "") == MagicFusionGuard.__name__ for m in app.user_middleware):
        return
    app.user_middleware.append(Middleware(MagicFusionGuard))
    app.middleware_stack = None  # rebuilt on the next request, as the WebUI's setup_middleware does
