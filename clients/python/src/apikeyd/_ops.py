"""The ops, written once for both clients (sans I/O).

``Ops`` has one method per op: its name, keyword-only parameters (type hints and
defaults) and docstring, and the request it makes, handed to ``self.call(op,
**params)``. Each client supplies ``call`` with its own I/O: ``Client.call`` returns
the result dict, so ``Ops[Dict[str, Any]]``; ``AsyncClient.call`` is a coroutine, so
``Ops[Coroutine[..., Dict[str, Any]]]`` (and ``apikeyd.aio`` turns each inherited
method into an ``async def``). Encoding, ``None`` parameters and integer ids are
``_wire``'s business, not the ops'.
"""

from __future__ import annotations

from typing import Any, Generic, Optional, TypeVar, Union

__all__ = ["Id", "Ops", "R"]

#: A user or channel id: a string, or a non-negative int (a Discord snowflake).
Id = Union[str, int]

#: What a client's ``call`` returns: the result dict, or a coroutine giving it.
R = TypeVar("R")


class Ops(Generic[R]):
    """One method per op, each ``self.call(op, **params)``; see the module docstring."""

    def call(self, op: str, *, timeout: Optional[float] = None, **params: Any) -> R:
        """Sends one request and returns its ``result``; raises an ``apikeyd.Error``
        subclass for an error answer. ``None`` parameters are left out. Writes get a
        fresh ``idempotency_key`` unless one is given; ``timeout`` (seconds, resends
        included) replaces the client's for this call."""
        raise NotImplementedError

    def ping(self, *, timeout: Optional[float] = None) -> R:
        """Checks the daemon answers: ``{"pong": true, "version": ...}``."""
        return self.call("ping", timeout=timeout)

    def get_user_api_key(
        self,
        *,
        user_id: Id,
        service: str,
        channel_id: Optional[Id] = None,
        fallback_to_pool: Optional[bool] = None,
        fallback_to_config: Optional[bool] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """The key for a user and service: user key, channel pool, global pool, then the operator's default. ``{"key", "source", ...}``."""
        return self.call(
            "get_user_api_key",
            user_id=user_id,
            service=service,
            channel_id=channel_id,
            fallback_to_pool=fallback_to_pool,
            fallback_to_config=fallback_to_config,
            timeout=timeout,
        )

    def get_gitea_credentials(
        self,
        *,
        user_id: Id,
        channel_id: Optional[Id] = None,
        fallback_to_pool: Optional[bool] = None,
        fallback_to_config: Optional[bool] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Gitea token and base URL: ``{"token", "base_url", "source", ...}``."""
        return self.call(
            "get_gitea_credentials",
            user_id=user_id,
            channel_id=channel_id,
            fallback_to_pool=fallback_to_pool,
            fallback_to_config=fallback_to_config,
            timeout=timeout,
        )

    def get_pool_api_key(self, *, service: str, timeout: Optional[float] = None) -> R:
        """A key of the global pool: ``{"key": str | None}``."""
        return self.call("get_pool_api_key", service=service, timeout=timeout)

    def get_channel_pool_api_key(self, *, channel_id: Id, service: str, timeout: Optional[float] = None) -> R:
        """A key of one channel's pool: ``{"key": str | None}``."""
        return self.call("get_channel_pool_api_key", channel_id=channel_id, service=service, timeout=timeout)

    def set_user_api_key(self, *, user_id: Id, service: str, key: str, idempotency_key: Optional[str] = None, timeout: Optional[float] = None) -> R:
        """Stores (durably) a user's own key: ``{"stored": true}``. A write."""
        return self.call("set_user_api_key", user_id=user_id, service=service, key=key, idempotency_key=idempotency_key, timeout=timeout)

    def delete_user_api_key(self, *, user_id: Id, service: str, idempotency_key: Optional[str] = None, timeout: Optional[float] = None) -> R:
        """Deletes a user's own key: ``{"deleted": bool}``. A write."""
        return self.call("delete_user_api_key", user_id=user_id, service=service, idempotency_key=idempotency_key, timeout=timeout)

    def list_user_api_keys(self, *, user_id: Id, timeout: Optional[float] = None) -> R:
        """A user's keys, masked: ``{"keys": [{"service", "masked", "updated_at"}]}``."""
        return self.call("list_user_api_keys", user_id=user_id, timeout=timeout)

    def add_pool_key(
        self,
        *,
        service: str,
        key: str,
        channel_id: Optional[Id] = None,
        label: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Adds a key to the global pool or a channel's (admins only): ``{"key_id", "added"}``. A write."""
        return self.call("add_pool_key", service=service, key=key, channel_id=channel_id, label=label, idempotency_key=idempotency_key, timeout=timeout)

    def remove_pool_key(
        self,
        *,
        service: str,
        key_id: str,
        channel_id: Optional[Id] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Removes a pool key (admins only): ``{"removed": bool}``. A write."""
        return self.call("remove_pool_key", service=service, key_id=key_id, channel_id=channel_id, idempotency_key=idempotency_key, timeout=timeout)

    def list_pool_keys(self, *, service: str, channel_id: Optional[Id] = None, timeout: Optional[float] = None) -> R:
        """A pool's keys, masked (admins only): ``{"keys": [...]}``."""
        return self.call("list_pool_keys", service=service, channel_id=channel_id, timeout=timeout)

    def check_default_key_limit(
        self,
        *,
        user_id: Id,
        tool_name: str,
        daily_limit: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Today's default-key count: ``{"allowed", "current_count", "daily_limit"}``."""
        return self.call(
            "check_default_key_limit",
            user_id=user_id,
            tool_name=tool_name,
            daily_limit=daily_limit,
            timeout=timeout,
        )

    def increment_default_key_usage(self, *, user_id: Id, tool_name: str, idempotency_key: Optional[str] = None, timeout: Optional[float] = None) -> R:
        """Counts one default-key use: ``{"count": int}``. A write."""
        return self.call("increment_default_key_usage", user_id=user_id, tool_name=tool_name, idempotency_key=idempotency_key, timeout=timeout)

    def consume_default_key_usage(
        self,
        *,
        user_id: Id,
        tool_name: str,
        daily_limit: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Atomic check-and-increment: ``{"allowed", "current_count", "daily_limit"}``. A write."""
        return self.call(
            "consume_default_key_usage",
            user_id=user_id,
            tool_name=tool_name,
            daily_limit=daily_limit,
            idempotency_key=idempotency_key,
            timeout=timeout,
        )

    def missing_api_key_error(self, *, service: str, timeout: Optional[float] = None) -> R:
        """The message telling a user how to get and set a key: ``{"message": str}``."""
        return self.call("missing_api_key_error", service=service, timeout=timeout)

    def default_key_limit_error(
        self,
        *,
        tool_name: str,
        current: int,
        limit: int,
        service: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """The daily-limit message: ``{"message": str}``. ``service`` is an apikeyd addition to the original module."""
        return self.call(
            "default_key_limit_error",
            tool_name=tool_name,
            current=current,
            limit=limit,
            service=service,
            timeout=timeout,
        )

    def report_key_result(
        self,
        *,
        service: str,
        outcome: str,
        key_id: Optional[str] = None,
        user_id: Optional[Id] = None,
        channel_id: Optional[Id] = None,
        retry_after_s: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Reports how a key fared (``ok``, ``rate_limited``, ``unauthorized``, ``error``): ``{"recorded", "state", "cooling_until"}``. A write; an apikeyd addition."""
        return self.call(
            "report_key_result",
            service=service,
            outcome=outcome,
            key_id=key_id,
            user_id=user_id,
            channel_id=channel_id,
            retry_after_s=retry_after_s,
            idempotency_key=idempotency_key,
            timeout=timeout,
        )

    def enable_pool_key(
        self,
        *,
        service: str,
        key_id: str,
        channel_id: Optional[Id] = None,
        idempotency_key: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> R:
        """Re-enables a disabled pool key (admins only): ``{"enabled": bool}``. A write; an apikeyd addition."""
        return self.call("enable_pool_key", service=service, key_id=key_id, channel_id=channel_id, idempotency_key=idempotency_key, timeout=timeout)

    def reload(self, *, timeout: Optional[float] = None) -> R:
        """Re-reads the config and master keyring (admins only): ``{"reloaded": true, ...}``."""
        return self.call("reload", timeout=timeout)

    def stats(self, *, timeout: Optional[float] = None) -> R:
        """Counters: ``{"uptime_s", "connections", "requests_total", "cache", "store", ...}``."""
        return self.call("stats", timeout=timeout)

    def metrics(self, *, timeout: Optional[float] = None) -> R:
        """The daemon's metrics in the Prometheus text format: ``{"text": str}``."""
        return self.call("metrics", timeout=timeout)
