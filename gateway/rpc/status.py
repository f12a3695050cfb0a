"""Bastion's errors as gRPC statuses, with the HTTP error body's details beside them.

The codes are Triton's (``src/grpc/grpc_utils.cc``): a bad request INVALID_ARGUMENT, an unknown
model NOT_FOUND, a full queue or a model that is not ready UNAVAILABLE, a server error INTERNAL.
Where HTTP says more than Triton's gRPC does, the standard code for it is used: 401
UNAUTHENTICATED, 403 PERMISSION_DENIED (a withheld image, a contained client, a wrong admin
token: UNAVAILABLE would tell a client to retry), 413 and 429 RESOURCE_EXHAUSTED, 501
UNIMPLEMENTED, 408 (a request that did not arrive in time) and 504 DEADLINE_EXCEEDED. The
details travel as a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer (the gRPC
richer error model): an ``ErrorInfo`` with the HTTP body's fields, and a ``RetryInfo`` with
``Retry-After``.
"""

from __future__ import annotations

from typing import Any

import grpc
import orjson
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from bastion.gateway.errors import BastionError

DOMAIN = "bastion"
MAX_MESSAGE_CHARS = 1024
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(exc: BastionError) -> grpc.StatusCode:
    """The gRPC code of an error (INTERNAL for anything unmapped)."""
    return _CODES.get(exc.status, grpc.StatusCode.INTERNAL)


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Messages quote client input; a status must not echo a megabyte back."""
    return message if len(message) <= limit else message[:limit] + "... (truncated)"


def to_status(exc: BastionError) -> grpc.Status:
    """The status for ``abort``: code, clipped message, and the details trailer."""
    code = code_of(exc)
    # HTTP's header is gRPC metadata, whose keys are lower case (tritonclient refuses others)
    message = clip(exc.message.replace("'Authorization: Bearer", "metadata 'authorization: Bearer"))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if exc.details:
        reason = str(exc.details.get("reason") or type(exc).__name__)
        info = error_details_pb2.ErrorInfo(
            reason=reason.upper(),
            domain=DOMAIN,
            metadata={k: _text(v) for k, v in exc.details.items() if v is not None},
        )
        status.details.add().Pack(info)
    retry_after = exc.headers.get("Retry-After")
    if retry_after is not None and retry_after.isdigit():
        retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=int(retry_after)))
        status.details.add().Pack(retry)
    return rpc_status.to_status(status)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()
