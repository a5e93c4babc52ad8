"""Result types: ``Key`` and ``LimitCheck`` for the drop-in module, and one
TypedDict per op's result for the clients' methods (at run time plain dicts).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # pragma: no cover - older Pythons: every member is optional to the checker
    from typing import TypedDict

    NotRequired = Optional  # type: ignore[assignment]

__all__ = [
    "Key",
    "LimitCheck",
    "KeyResult",
    "GiteaResult",
    "PoolKeyResult",
    "LimitResult",
    "CountResult",
    "MessageResult",
    "StoredResult",
    "DeletedResult",
    "MaskedKey",
    "KeyListResult",
    "AddedResult",
    "RemovedResult",
    "ReportResult",
    "EnabledResult",
    "PingResult",
    "MetricsResult",
]


class Key(str):
    """A key as the original module returned it (a ``str``: every existing use keeps
    working), carrying what the daemon said about it:

    - ``source``: ``"user"``, ``"channel_pool"``, ``"global_pool"`` or ``"config"``
      (the operator's key), or None when the daemon did not say;
    - ``key_id``: the pool key's id, to pass to ``report_key_result``; None otherwise;
    - ``degraded``: True when a store was skipped because it failed (e.g. Redis down),
      so this may not be the key the user would normally get;
    - ``warning``: a text for the user (e.g. their own key was rejected), or None.

    ``repr()`` masks the key, so that logging a Key does not leak it.
    """

    source: Optional[str]
    key_id: Optional[str]
    degraded: bool
    warning: Optional[str]

    def __new__(
        cls,
        value: str,
        *,
        source: Optional[str] = None,
        key_id: Optional[str] = None,
        degraded: bool = False,
        warning: Optional[str] = None,
    ) -> "Key":
        self = super().__new__(cls, value)
        self.source = source
        self.key_id = key_id
        self.degraded = degraded
        self.warning = warning
        return self

    @classmethod
    def from_result(cls, result: Mapping[str, Any], member: str = "key") -> "Optional[Key]":
        value = result.get(member)
        if not isinstance(value, str):
            return None
        return cls(
            value,
            source=result.get("source"),
            key_id=result.get("key_id"),
            degraded=result.get("degraded") is True,
            warning=result.get("warning"),
        )

    def __repr__(self) -> str:
        masked = f"{self[:3]}…{self[-4:]}" if len(self) > 12 else "…"
        return (
            f"Key({masked!r}, source={self.source!r}, key_id={self.key_id!r}, "
            f"degraded={self.degraded!r}, warning={self.warning!r})"
        )

    def __reduce__(self) -> Any:
        return (_key, (str(self), self.source, self.key_id, self.degraded, self.warning))


def _key(value: str, source: Optional[str], key_id: Optional[str], degraded: bool, warning: Optional[str]) -> Key:
    return Key(value, source=source, key_id=key_id, degraded=degraded, warning=warning)


class _Limit(NamedTuple):
    allowed: bool
    current_count: int
    daily_limit: int


class LimitCheck(_Limit):
    """``(allowed, current_count, daily_limit)`` as the original returned (a tuple:
    unpacking and comparing keep working), plus ``degraded``: True when the quota
    store could not be read (e.g. Redis down) and the figures are not today's count."""

    degraded: bool

    def __new__(cls, allowed: bool, current_count: int, daily_limit: int, degraded: bool = False) -> "LimitCheck":
        self = super().__new__(cls, allowed, current_count, daily_limit)
        self.degraded = degraded
        return self

    @classmethod
    def from_result(cls, r: Mapping[str, Any]) -> "LimitCheck":
        return cls(bool(r["allowed"]), int(r["current_count"]), int(r["daily_limit"]), r.get("degraded") is True)

    def __repr__(self) -> str:
        return (
            f"LimitCheck(allowed={self.allowed!r}, current_count={self.current_count!r}, "
            f"daily_limit={self.daily_limit!r}, degraded={self.degraded!r})"
        )

    def __reduce__(self) -> Any:
        return (LimitCheck, (self.allowed, self.current_count, self.daily_limit, self.degraded))


# The clients' results (docs/protocol.md has every member).


class PingResult(TypedDict):
    pong: bool
    version: str


class _Resolved(TypedDict):
    """What every answer of the key resolution says besides the key itself."""

    source: Optional[str]
    key_id: NotRequired[str]
    message: NotRequired[str]
    retry_after_s: NotRequired[int]
    warning: NotRequired[str]
    degraded: NotRequired[bool]


class KeyResult(_Resolved):
    key: Optional[str]


class GiteaResult(_Resolved):
    token: Optional[str]
    base_url: Optional[str]


class PoolKeyResult(TypedDict):
    key: Optional[str]
    key_id: NotRequired[str]


class LimitResult(TypedDict):
    allowed: bool
    current_count: int
    daily_limit: int
    degraded: NotRequired[bool]


class CountResult(TypedDict):
    count: int


class MessageResult(TypedDict):
    message: str


class StoredResult(TypedDict):
    stored: bool


class DeletedResult(TypedDict):
    deleted: bool


class MaskedKey(TypedDict):
    service: str
    masked: str
    updated_at: Any


class KeyListResult(TypedDict):
    keys: List[Dict[str, Any]]


class AddedResult(TypedDict):
    key_id: str
    added: bool


class RemovedResult(TypedDict):
    removed: bool


class ReportResult(TypedDict):
    recorded: bool
    state: Optional[str]
    cooling_until: Optional[int]


class EnabledResult(TypedDict):
    enabled: bool


class MetricsResult(TypedDict):
    text: str
