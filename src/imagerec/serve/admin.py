"""The admin endpoints (load or unload a model version, switch the default, reload), always behind an
admin key, and `admin_actions`: what each does to one process (serve.workers repeats it in every
worker). Plain `def` handlers: loading a checkpoint blocks, so they run in FastAPI's thread pool."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from imagerec.serve.auth import ADMIN_SECURITY, ApiKeys, require_admin_key
from imagerec.serve.entries import ModelEntry
from imagerec.serve.errors import ApiError, error_responses
from imagerec.serve.registry import ModelRegistry
from imagerec.serve.settings import ModelSource
from imagerec.serve.workers import PartlyApplied
from imagerec.utils import ImageRecError

router = APIRouter()


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="run directory or bundle, inside one of the server's model dirs"
    )
    name: str | None = None
    version: str | None = None
    make_default: bool = False


class DefaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    version: str | None = None
    keys: bool = True


@contextlib.contextmanager
def _model_load_failures(what: str) -> Iterator[None]:
    """A model that fails to load is the admin's input (a broken checkpoint), not a server bug: 422."""
    try:
        yield
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(422, "model_load_failed", f"{what}: {type(e).__name__}: {e}"[:500]) from e


def resolve_model_path(raw: str, allowed: tuple[Path, ...]) -> Path:
    """A path the admin endpoint may load: inside one of the server's allowed model dirs, existing."""
    if not raw or "\x00" in raw or len(raw) > 4096:
        raise ApiError(
            400, "invalid_path", "'path' must be a non-empty path on the server"
        )
    if "://" in raw:
        raise ApiError(
            400,
            "invalid_path",
            "URLs are never fetched: give the path of a run directory or bundle inside the server's model dirs",
        )
    given = Path(raw)
    # A relative path may name a folder in any of the dirs: each is tried, in order.
    candidates = [given] if given.is_absolute() else [d / given for d in allowed]
    inside = False
    for c in candidates:
        resolved = c.resolve()
        if any(resolved == d or resolved.is_relative_to(d) for d in allowed):
            if resolved.exists():
                return resolved
            inside = True
    dirs = ", ".join(map(str, allowed))
    if inside:
        where = "does not exist" if given.is_absolute() else "is in none of the server's model dirs"
        raise ApiError(
            404,
            "path_not_found",
            f"'{raw}' {where} ({dirs}); give a run directory or bundle that exists in one of them",
        )
    raise ApiError(
        403,
        "path_not_allowed",
        f"'{raw}' is outside the server's model dirs ({dirs})",
    )


def admin_actions(registry: ModelRegistry, keys: ApiKeys) -> Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """What each admin action does to one process's registry and keys (serve.workers.Admin runs it
    here and in every other worker). Returns (the client's answer, the action as others repeat it)."""

    def apply(action: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        op = action["op"]
        if op == "default":
            entry = registry.set_default(action["name"], action["version"])
            return {"default": {"name": entry.name, "version": entry.version}}, action
        if op == "load":
            with _model_load_failures(f"cannot load '{action['given']}'"):
                entry = registry.load(
                    ModelSource(action["path"], action["name"], action["version"]),
                    make_default=action["make_default"],
                    expect_weights=action.get("weights"),
                )
            # The others load the same name, version and weights, even where this one assigned the version.
            repeat = {**action, "name": entry.name, "version": entry.version, "weights": entry.weights}
            return entry.card(default=entry is registry.default()), repeat
        if op == "unload":
            entry = registry.unload(action["name"], action["version"])
            return {"unloaded": {"name": entry.name, "version": entry.version}}, action
        if op == "reload":
            return _reload(registry, keys, action), action
        raise ValueError(f"unknown admin action {op!r}")

    return apply


def _reload(registry: ModelRegistry, keys: ApiKeys, action: dict[str, Any]) -> dict[str, Any]:
    """Reload the models (all or nothing: registry.reload) and, whatever became of them, the API
    key file. The answer, or the error's extra fields, say what each did: "reloaded" (the model
    versions swapped in), "api_keys" (keys now in force, None when not re-read) and "api_keys_error"."""
    model_error: ApiError | None = None
    fresh: list[ModelEntry] = []
    try:
        with _model_load_failures("reload failed"):
            fresh = registry.reload(action["name"], action["version"])
    except ApiError as e:
        model_error = e
    n_keys: int | None = None
    keys_error: str | None = None
    if action["keys"] and keys.path:
        try:
            n_keys = keys.reload()
        except ImageRecError as e:
            keys_error = f"{e}; the previous keys stay in force"
    answer: dict[str, Any] = {
        "reloaded": [{"name": e.name, "version": e.version} for e in fresh],
        "api_keys": n_keys,
    }
    if model_error is None and keys_error is None:
        return answer
    if keys_error is not None:
        answer["api_keys_error"] = keys_error
    if model_error is not None:
        error = ApiError(model_error.status, model_error.type, model_error.message, model_error.headers, answer)
        changed = n_keys is not None  # the keys were re-read though no model was
    else:
        error = ApiError(422, "key_file_invalid", keys_error or "", extra=answer)
        changed = True  # the models were swapped in though the keys stay
    # What did happen here must happen in every worker too (serve.workers.Admin.run).
    raise PartlyApplied(error, action) if changed else error


def _run_admin(request: Request, action: dict[str, Any]) -> dict[str, Any]:
    """Run an admin action (in every worker process, with --workers); the answer says how many
    workers applied it when there are several."""
    try:
        result, workers = request.app.state.admin.run(action)
    except PartlyApplied as e:  # failed, but logged for every worker: raise what failed
        error = e.error
        if isinstance(error, ApiError) and e.workers is not None:
            error.extra["workers"] = e.workers
        raise error from None
    return result if workers is None else {**result, "workers": workers}


@router.post(
    "/v1/admin/models",
    tags=["admin"],
    status_code=201,
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 403, 404, 409, 422),
    openapi_extra={"security": ADMIN_SECURITY},
)
def admin_load_model(request: Request, body: LoadModelRequest) -> dict[str, Any]:
    """Load a model version from a path in the server's model dirs (never a URL)."""
    path = resolve_model_path(body.path, request.app.state.settings.allowed_model_dirs)
    return _run_admin(request, {"op": "load", "path": str(path), "given": body.path, "name": body.name,
                                "version": body.version, "make_default": body.make_default})


@router.delete(
    "/v1/admin/models/{name}/versions/{version}", tags=["admin"], dependencies=[Depends(require_admin_key)],
    responses=error_responses(403, 404, 409, 422), openapi_extra={"security": ADMIN_SECURITY},
)
def admin_unload_model(request: Request, name: str, version: str) -> dict[str, Any]:
    """Stop serving a version (never the default: 409): new requests for it get 404 at once, the
    ones already running finish on it, then its model is freed. Its folder is not touched."""
    return _run_admin(request, {"op": "unload", "name": name, "version": version})


@router.post(
    "/v1/admin/default", tags=["admin"], dependencies=[Depends(require_admin_key)],
    responses=error_responses(403, 404, 422), openapi_extra={"security": ADMIN_SECURITY},
)
def admin_set_default(request: Request, body: DefaultRequest) -> dict[str, Any]:
    """Make a loaded version the default for /v1/predict (atomic; running requests are unaffected)."""
    return _run_admin(request, {"op": "default", "name": body.name, "version": body.version})


@router.post(
    "/v1/admin/reload", tags=["admin"], dependencies=[Depends(require_admin_key)],
    responses=error_responses(403, 404, 422), openapi_extra={"security": ADMIN_SECURITY},
)
def admin_reload(request: Request, body: ReloadRequest | None = None) -> dict[str, Any]:
    """Re-read checkpoints (all versions, or one) and the API key file."""
    body = body or ReloadRequest()
    if (body.name is None) != (body.version is None):
        raise ApiError(
            422,
            "invalid_parameter",
            "give both 'name' and 'version' to reload one model, or neither to reload all",
        )
    return _run_admin(request, {"op": "reload", "name": body.name, "version": body.version, "keys": body.keys})
