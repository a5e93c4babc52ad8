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
    IdempotencyConflict,
    Internal,
    PermissionDenied,
    Timeout,
    TooLarge,
    Unavailable,
    UnknownOp,
    WrongEventLoop,
)
from ._results import (
    AddedResult,
    CountResult,
    DeletedResult,
    EnabledResult,
    GiteaResult,
    Key,
    KeyListResult,
    KeyResult,
    LimitCheck,
    LimitResult,
    MessageResult,
    MetricsResult,
    PingResult,
    PoolKeyResult,
    RemovedResult,
    ReportResult,
    StoredResult,
)
from ._discover import DEFAULT_SOCKET
from ._wire import READ_OPS, WRITE_OPS
from .aio import AsyncClient
from .client import Client, Id

__version__ = "0.1.0"

__all__ = [
    "AddedResult",
    "CountResult",
    "DeletedResult",
    "EnabledResult",
    "GiteaResult",
    "Key",
    "KeyListResult",
    "KeyResult",
    "LimitCheck",
    "LimitResult",
    "MessageResult",
    "MetricsResult",
    "PingResult",
    "PoolKeyResult",
    "RemovedResult",
    "ReportResult",
    "StoredResult",
    "AsyncClient",
    "BadConfig",
    "BadRequest",
    "Client",
    "DEFAULT_SOCKET",
    "DaemonUnreachable",
    "Error",
    "Forbidden",
    "Id",
    "IdempotencyConflict",
    "Internal",
    "PermissionDenied",
    "Timeout",
    "READ_OPS",
    "TooLarge",
    "Unavailable",
    "UnknownOp",
    "WRITE_OPS",
    "WrongEventLoop",
    "__version__",
]
