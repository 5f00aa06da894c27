"""HTTP routes: version, params schema, expert status and unloading. They honour --api-auth."""

from __future__ import annotations

import os
import secrets

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from modules import script_callbacks, shared

from .. import __version__
from ..params import FusionParams
from . import extension, host

PREFIX = "/magicfusion/v1"


def _credentials() -> dict[str, str]:
    text = getattr(shared.cmd_opts, "api_auth", None)
    if not text:
        return {}
    return dict(item.split(":", 1) for item in text.strip('"').replace("\n", "").split(",") if ":" in item)


def credentials_ok(user: str | None, password: str | None) -> bool:
    """Whether --api-auth (if set) accepts these credentials: the WebUI's own rule."""
    allowed = _credentials()
    if not allowed:
        return True
    return user in allowed and password is not None and secrets.compare_digest(password.encode(), allowed[user].encode())


def _auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic(auto_error=False))):
    if credentials_ok(credentials.username if credentials else None, credentials.password if credentials else None):
        return True
    raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})


def _callbacks() -> dict[str, int]:
    """How many of the WebUI's callbacks are this extension's, per kind (a reload must not double them)."""
    root = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
    counts: dict[str, int] = {}
    for key, callbacks in script_callbacks.callback_map.items():
        n = sum(1 for c in callbacks if os.path.realpath(getattr(c, "script", "") or "").startswith(root + os.sep))
        if n:
            counts[key.removeprefix("callbacks_")] = n
    return counts


def status() -> dict:
    adapter = host.adapter()
    loaded = adapter.cache.loaded()
    return {
        "version": __version__,
        "expert_loaded": loaded[-1].title if loaded else None,   # the most recently used
        "experts_loaded": [e.title for e in loaded],
        "expert_bytes": sum(adapter.memory_bytes(e) for e in loaded),
        "expert_loads": adapter.cache.loads,
        "host": host.name(),
        "callbacks": _callbacks(),
        "last_generation": extension.last_report,
    }


def unload() -> dict:
    freed = extension.unload()  # takes the WebUI's queue lock: never in the middle of a generation
    return {"unloaded": freed, **status()}


def register(app: FastAPI) -> None:
    deps = [Depends(_auth)]
    app.add_api_route(f"{PREFIX}/version", lambda: {"version": __version__}, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/schema", FusionParams.json_schema, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/unload", unload, methods=["POST"], dependencies=deps)
