"""One exception tree for toolbus; the client raises the same classes the service uses.

ToolbusError
├── ServiceError           a request the service could not serve (ADR-32 error reply)
│   ├── BadRequest          400
│   ├── Unauthorized        401
│   ├── Forbidden           403
│   ├── NotFound            404
│   ├── PayloadTooLarge     413
│   ├── Overloaded          429
│   ├── InternalError       500
│   └── NoCapacity          503
├── RequestTimeout         the client gave up waiting for a reply
└── StartupError           a part of the service could not start (server, worker, backend)
"""

from __future__ import annotations

from typing import ClassVar

from schemas.errors import ErrorBody, ErrorCode, ErrorKind


class ToolbusError(Exception):
    """Root of every error toolbus raises."""


class ServiceError(ToolbusError):
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    default_kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = str(kind or self.default_kind)
        self.retry_after_s = retry_after_s  # a hint for when to send the call again (429)

    def body(self) -> ErrorBody:
        return ErrorBody(
            code=int(self.code),
            error=self.kind,
            message=self.message,
            retry_after_s=self.retry_after_s,
        )

    @staticmethod
    def from_reply(code: int, body: ErrorBody | None, header_message: str) -> ServiceError:
        """Rebuild the exception a reply carried (client side)."""
        cls = _BY_CODE.get(code, ServiceError)
        if body is None:
            return cls(header_message)
        return cls(body.message, kind=body.error, retry_after_s=body.retry_after_s)

    def __str__(self) -> str:
        return f"{int(self.code)} {self.kind}: {self.message}"


class BadRequest(ServiceError):
    code = ErrorCode.BAD_REQUEST
    default_kind = ErrorKind.INVALID_REQUEST


class Unauthorized(ServiceError):
    code = ErrorCode.UNAUTHORIZED
    default_kind = ErrorKind.UNAUTHORIZED


class Forbidden(ServiceError):
    code = ErrorCode.FORBIDDEN
    default_kind = ErrorKind.FORBIDDEN


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND
    default_kind = ErrorKind.NO_ACTIVE_SLOT


class PayloadTooLarge(ServiceError):
    code = ErrorCode.PAYLOAD_TOO_LARGE
    default_kind = ErrorKind.PAYLOAD_TOO_LARGE


class Overloaded(ServiceError):
    code = ErrorCode.OVERLOADED
    default_kind = ErrorKind.OVERLOADED


class InternalError(ServiceError):
    code = ErrorCode.INTERNAL
    default_kind = ErrorKind.INTERNAL


class NoCapacity(ServiceError):
    code = ErrorCode.NO_CAPACITY
    default_kind = ErrorKind.NO_CAPACITY


_BY_CODE: dict[int, type[ServiceError]] = {
    int(cls.code): cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        PayloadTooLarge,
        Overloaded,
        InternalError,
        NoCapacity,
    )
}


class RequestTimeout(ToolbusError):
    """No reply within the client's deadline."""


class StartupError(ToolbusError):
    """A part of the service could not start; the message says which and why."""
