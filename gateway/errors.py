"""Errors that carry their HTTP status; one handler turns them into ``{"error": "..."}``.

The mapping follows Triton's (NOT_FOUND 404, UNAVAILABLE 503, UNSUPPORTED 501, the rest 400).
"""

from __future__ import annotations

from typing import Any


class BastionError(Exception):
    status: int = 500
    reason: str = "OTHER"
    headers: dict[str, str] = {}  # noqa: RUF012 (read-only: extra response headers)

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        """The v2 error body: ``error`` first, machine-readable details beside it."""
        return {"error": self.message, **self.details}


class InvalidInput(BastionError):
    status = 400
    reason = "REJECTED"


class NotFound(BastionError):
    status = 404
    reason = "REJECTED"


class Unauthorized(BastionError):
    """No valid client key where keys are required (RFC 6750 section 3: a Bearer challenge)."""

    status = 401
    reason = "REJECTED"
    headers = {"WWW-Authenticate": 'Bearer realm="bastion"'}  # noqa: RUF012


class Forbidden(BastionError):
    status = 403
    reason = "REJECTED"


class Blocked(BastionError):
    """Screening withheld the prediction of at least one image of the request."""

    status = 403
    reason = "REJECTED"


class MethodNotAllowed(BastionError):
    """A known route asked with a method it does not take (RFC 9110 section 15.5.6: ``Allow``
    lists the ones it does)."""

    status = 405
    reason = "REJECTED"

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.headers = {"Allow": allow}


class PayloadTooLarge(BastionError):
    status = 413
    reason = "REJECTED"


class Unsupported(BastionError):
    status = 501
    reason = "REJECTED"


class TooManyRequests(BastionError):
    """A throttled client (RFC 6585 section 4); ``Retry-After`` says when to come back."""

    status = 429
    reason = "REJECTED"

    def __init__(self, message: str, retry_after_s: int, details: dict | None = None) -> None:
        super().__init__(message, details)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}


class Unavailable(BastionError):
    """Overload or a model that is not ready: the client may retry."""

    status = 503
    reason = "REJECTED"


class DeadlineExceeded(BastionError):
    status = 504
    reason = "CANCELED"


class BackendError(BastionError):
    status = 500
    reason = "BACKEND"
