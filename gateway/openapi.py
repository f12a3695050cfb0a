"""The OpenAPI documents: a public one without admin routes, and a full one behind the token.

FastAPI describes its own routes; inference runs on the ASGI fast path (``gateway.asgi``), so its
two paths are added here from the pydantic models of ``gateway.protocol.schema``. Operations
tagged ``admin`` are left out of the public document (``/openapi.json``, ``/docs``): an
anonymous caller learns nothing of the admin surface. ``/v2/admin/openapi.json`` (admin token)
serves everything, for the operator's tools and for fuzzing with the token.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

from bastion.gateway.http import ADMIN_ERRORS, require_admin
from bastion.gateway.protocol.schema import (
    FRONT_DOOR,
    ErrorBody,
    InferenceRequest,
    InferenceResponse,
    WithheldBody,
)

ADMIN_TAG = "admin"
router = APIRouter()
_REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _error(description: str, schema: str = "ErrorBody") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _infer_operation(versioned: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "Bytes of JSON before the binary tensors (Triton's binary extension).",
            "schema": {"type": "integer", "minimum": 0},
        },
        {
            "name": "Content-Encoding",
            "in": "header",
            "required": False,
            "description": "gzip or deflate to send a compressed body.",
            "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]},
        },
        {
            "name": "Accept-Encoding",
            "in": "header",
            "required": False,
            "description": "gzip or deflate for a compressed response.",
            "schema": {"type": "string"},
        },
        {
            "name": "X-Client-ID",
            "in": "header",
            "required": False,
            "description": "Who the client is (quarantine records, quotas); else the peer "
            "address. Letters, digits and ._~:@/+=-, at most 128 characters (400 otherwise).",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._~:@/+=-]{1,128}$"},
        },
        {
            "name": "Authorization",
            "in": "header",
            "required": False,
            "description": "'Bearer <admin token>' grants the screening_report parameter.",
            "schema": {"type": "string"},
        },
    ]
    if versioned:
        parameters.insert(
            1,
            {
                "name": "version",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
            },
        )
    front = {str(code): _error(item["description"]) for code, item in FRONT_DOOR.items()}
    return {
        "post": {
            "summary": "Inference (KServe v2, Triton's binary tensor and classification "
            "extensions)",
            "operationId": "infer_versioned" if versioned else "infer",
            "parameters": parameters,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("InferenceRequest")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "200": {
                    "description": "Outputs (JSON, or JSON then binary tensors)",
                    "content": {
                        "application/json": {"schema": _ref("InferenceResponse")},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "400": _error("The request does not fit the protocol or the model."),
                "401": _error(
                    "Client keys are configured and the request carries no valid one "
                    "('Authorization: Bearer <key>'; WWW-Authenticate: Bearer)."
                ),
                "403": _error(
                    "Screening withheld an image (reason adversarial or suspicious), the "
                    "stateful defence refused the request (reason contained, repeat or probe), "
                    "or a capability (screening_report) needs the admin token.",
                    "WithheldBody",
                ),
                "404": _error("No such model or version."),
                "429": _error(
                    "The client is throttled by the stateful defence (Retry-After says when)."
                ),
                "501": _error("An unsupported feature was asked for."),
                "504": _error("The request's deadline passed before it ran."),
                **front,
            },
        }
    }


def build(app: FastAPI, include_admin: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    if not include_admin:
        for path in list(doc["paths"]):
            operations = {
                method: op
                for method, op in doc["paths"][path].items()
                if ADMIN_TAG not in op.get("tags", [])
            }
            if operations:
                doc["paths"][path] = operations
            else:
                del doc["paths"][path]
    for operations in doc["paths"].values():
        for op in operations.values():
            responses = op.get("responses", {})
            # request validation answers 400 here (Triton's status), never FastAPI's 422
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error("A malformed parameter or body."))
            for code, response in responses.items():
                if code[0] in "45":  # every error is a JSON body, whatever the route's type
                    schema = (
                        response.get("content", {})
                        .get("application/json", {})
                        .get("schema", _ref("ErrorBody"))
                    )
                    response["content"] = {"application/json": {"schema": schema}}
    doc["paths"]["/v2/models/{model}/infer"] = _infer_operation(False)
    doc["paths"]["/v2/models/{model}/versions/{version}/infer"] = _infer_operation(True)
    models = [(m, "validation") for m in (InferenceRequest, ErrorBody, WithheldBody)]
    models.append((InferenceResponse, "serialization"))
    _, defs = models_json_schema(models, ref_template=_REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    _prune_schemas(doc)
    return doc


def _prune_schemas(doc: dict[str, Any]) -> None:
    """Drops component schemas no remaining operation reaches (the admin bodies, in public)."""
    schemas = doc["components"]["schemas"]
    reached: set[str] = set()
    pending = [doc["paths"]]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in reached and name in schemas:
                    reached.add(name)
                    pending.append(schemas[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    for name in set(schemas) - reached:
        del schemas[name]


def install(app: FastAPI) -> None:
    """Serves the public document at ``/openapi.json`` and the admin one, each built and
    serialised once (a public route that re-encoded a 60 KB document per request would be a
    cheap way to keep the event loop busy)."""
    cache: dict[bool, bytes] = {}

    def document(include_admin: bool) -> bytes:
        if include_admin not in cache:
            cache[include_admin] = orjson.dumps(build(app, include_admin))
        return cache[include_admin]

    app.openapi = lambda: orjson.loads(document(False))  # type: ignore[method-assign]
    app.state.openapi_document = document
    app.include_router(router)


@router.get("/openapi.json", include_in_schema=False)
async def public_openapi(request: Request) -> Response:
    return Response(request.app.state.openapi_document(False), media_type="application/json")


@router.get("/v2/admin/openapi.json", tags=[ADMIN_TAG], responses=ADMIN_ERRORS)
async def admin_openapi(request: Request) -> Response:
    """The whole API, admin routes included."""
    require_admin(request)
    return Response(request.app.state.openapi_document(True), media_type="application/json")
