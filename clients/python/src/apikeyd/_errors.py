"""Exceptions: one class per wire error code, plus DaemonUnreachable.

Messages come from the daemon (which never puts key material in them) or from this
package (which names ops, socket paths and errno texts, never parameters).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

__all__ = [
    "Error",
    "BadRequest",
    "UnknownOp",
    "Forbidden",
    "TooLarge",
    "Unavailable",
    "Internal",
    "DaemonUnreachable",
    "error_from_wire",
]


class Error(Exception):
    """An error answer from apikeyd (or, for DaemonUnreachable, no answer at all).

    ``code`` is the wire code (``"bad_request"``, ...); ``message`` the daemon's text
    for a human.
    """

    code: str = "error"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    def __reduce__(self) -> "tuple[Any, ...]":  # pickle keeps code and message
        return (_rebuild, (type(self), self.message, self.code))


def _rebuild(cls: Type[Error], message: str, code: str) -> Error:
    return cls(message, code)


class BadRequest(Error):
    """A parameter is missing, of the wrong type or invalid (``bad_request``)."""

    code = "bad_request"


class UnknownOp(Error):
    """The daemon does not know this op (``unknown_op``); it may be older than the client."""

    code = "unknown_op"


class Forbidden(Error):
    """The caller's uid/gid may not use this op, or the daemon at all (``forbidden``)."""

    code = "forbidden"


class TooLarge(Error):
    """The request line was longer than ``server.max_line_bytes`` (``too_large``)."""

    code = "too_large"


class Unavailable(Error):
    """A backing store (Redis, SQLite) cannot be reached right now (``unavailable``)."""

    code = "unavailable"


class BadConfig(Error):
    """``reload`` found the config file (or its master key file) unusable; the message
    says what is wrong and nothing was changed (``bad_config``)."""

    code = "bad_config"


class Internal(Error):
    """Anything else went wrong in the daemon (``internal``)."""

    code = "internal"


class DaemonUnreachable(Error):
    """No daemon answered: the socket is missing or refused, the call timed out, or
    the connection broke after a write was sent (the write may or may not have been
    applied, so it was not sent again)."""

    code = "daemon_unreachable"


_BY_CODE: Dict[str, Type[Error]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownOp, Forbidden, TooLarge, Unavailable, BadConfig, Internal)
}


def error_from_wire(error: object) -> Error:
    """The exception for a response's ``error`` member; unknown codes give a plain Error."""
    if not isinstance(error, dict):
        return Internal("malformed error answer from the daemon")
    code = error.get("code")
    message = error.get("message")
    if not isinstance(code, str):
        code = "internal"
    if not isinstance(message, str):
        message = ""
    cls = _BY_CODE.get(code)
    if cls is None:
        return Error(message, code)
    return cls(message)
