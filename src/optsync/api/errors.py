"""Pinpoint's error shapes: ``x-amzn-ErrorType`` header and ``{"Message", "RequestID"}`` body."""

from __future__ import annotations

import json

from starlette.responses import Response

from optsync.errors import InvalidRequest, NotFound

__all__ = ("ApiError", "error_reply", "error_response", "from_engine_error")


class ApiError(Exception):
    """An error answered with one of Pinpoint's modelled exception shapes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, "BadRequestException", message)

    @classmethod
    def forbidden(cls, message: str) -> ApiError:
        return cls(403, "ForbiddenException", message)

    @classmethod
    def access_denied(cls, message: str) -> ApiError:
        """A valid signature, but the key may not do this (a scoped or read-only key)."""
        return cls(403, "AccessDeniedException", message)

    @classmethod
    def not_found(cls, message: str) -> ApiError:
        return cls(404, "NotFoundException", message)

    @classmethod
    def method_not_allowed(cls, message: str) -> ApiError:
        return cls(405, "MethodNotAllowedException", message)

    @classmethod
    def payload_too_large(cls, message: str) -> ApiError:
        return cls(413, "PayloadTooLargeException", message)

    @classmethod
    def unavailable(cls, request_id: str) -> ApiError:
        """The engine cannot answer now (its database is down or failing over); a 5xx that
        boto3 retries on its own."""
        return cls(
            503,
            "InternalServerErrorException",
            f"The engine's database is unavailable; retry shortly (request {request_id})",
        )

    @classmethod
    def internal(cls, request_id: str) -> ApiError:
        return cls(
            500,
            "InternalServerErrorException",
            f"Internal server error; the server log has the details under request {request_id}",
        )


def from_engine_error(exc: InvalidRequest | NotFound) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError.not_found(str(exc))
    return ApiError.bad_request(str(exc))


def error_reply(error: ApiError, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The error as ASGI parts: status, raw headers and body."""
    body = json.dumps({"Message": error.message, "RequestID": request_id}).encode()
    headers = [
        (b"x-amzn-requestid", request_id.encode()),
        (b"x-amzn-errortype", error.code.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
    ]
    return error.status, headers, body


def error_response(error: ApiError, request_id: str) -> Response:
    """The error as a Starlette response."""
    status, headers, body = error_reply(error, request_id)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response
