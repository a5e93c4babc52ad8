"""Python client for apikeyd, the daemon that hands API keys to local processes.

``Client`` (blocking, thread-safe) and ``AsyncClient`` (asyncio, pipelined) have one
method per op plus ``call(op, **params)``. ``apikeyd.manage_api_keys`` is a drop-in
for the original ``tools.manage_api_keys`` module. Documentation: docs/python.md.
"""

from ._errors import (
    BadConfig,
    BadRequest,
    DaemonUnreachable,
    Error,
    Forbidden,
    Internal,
    TooLarge,
    Unavailable,
    UnknownOp,
)
from ._wire import DEFAULT_SOCKET, READ_OPS, WRITE_OPS
from .aio import AsyncClient
from .client import Client, Id

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadConfig",
    "BadRequest",
    "Client",
    "DEFAULT_SOCKET",
    "DaemonUnreachable",
    "Error",
    "Forbidden",
    "Id",
    "Internal",
    "READ_OPS",
    "TooLarge",
    "Unavailable",
    "UnknownOp",
    "WRITE_OPS",
    "__version__",
]
