"""Drop-in replacement for the original ``tools.manage_api_keys`` module.

Change ``from tools import manage_api_keys`` to ``from apikeyd import manage_api_keys``
(or ``import apikeyd.manage_api_keys as manage_api_keys``): the functions keep their
names, parameters, defaults, sync/async kinds and return types, but ask apikeyd
instead of reading Redis.

- ``redis_client`` is accepted everywhere and ignored: the daemon owns the stores.
- ``config`` is accepted and ignored: the operator's default key (the last fallback)
  comes from the daemon's configuration (``services.<name>.env``), not from the bot.
- The socket is found as the ``apikeyd`` command line finds it (``$APIKEYD_SOCKET``,
  else ``server.socket`` of ``$APIKEYD_CONFIG`` or ``./config.toml``, else
  /run/apikeyd/apikeyd.sock); call ``configure(socket=..., timeout=...)`` once at
  start-up to choose another.
- User and channel ids may be ints (Discord snowflakes) or strings.
- Keys come back as ``apikeyd.Key`` (a ``str`` with ``.source``, ``.key_id``,
  ``.degraded``, ``.warning``); limits as ``apikeyd.LimitCheck`` (the original's
  tuple, with ``.degraded``).
- Errors raise ``apikeyd.Error`` subclasses (``DaemonUnreachable`` when no daemon
  answers), except the two message functions, which do no I/O and never raise.
- One AsyncClient per event loop, closed when that loop shuts down (``asyncio.run``
  returning): no connection outlives its loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any, AsyncGenerator, Dict, List, Optional, Union

from ._results import Key, LimitCheck
from ._services import GENERIC_MISSING, Messages, limit_text
from .aio import AsyncClient
from .client import Client, Id

__all__ = [
    "configure",
    "get_user_api_key",
    "get_gitea_credentials",
    "get_pool_api_key",
    "get_channel_pool_api_key",
    "check_default_key_limit",
    "increment_default_key_usage",
    "consume_default_key_usage",
    "missing_api_key_error",
    "default_key_limit_error",
    "set_user_api_key",
    "delete_user_api_key",
    "list_user_api_keys",
    "report_key_result",
]

_settings: Dict[str, Any] = {"socket": None, "timeout": 5.0, "connect_timeout": 5.0}
_lock = threading.Lock()
# One AsyncClient per event loop: asyncio transports belong to the loop that made them.
_async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient]" = (
    weakref.WeakKeyDictionary()
)


def configure(
    socket: "Optional[Union[str, os.PathLike[str]]]" = None,
    *,
    timeout: float = 5.0,
    connect_timeout: float = 5.0,
) -> None:
    """Chooses the socket and timeouts for the module's shared clients (call it
    before the first request; later calls replace the clients)."""
    with _lock:
        _settings.update(socket=socket, timeout=timeout, connect_timeout=connect_timeout)
        olds = list(_async_clients.values())
        _async_clients.clear()
    for c in olds:
        c._abandon()
    messages.forget()


async def _closed_with_loop(client: AsyncClient) -> AsyncGenerator[None, None]:
    # An async generator the loop tracks: asyncio.run (loop.shutdown_asyncgens)
    # closes it before closing the loop, and so closes the client's connections.
    try:
        yield
    finally:
        await client.aclose()


async def _aclient() -> AsyncClient:
    loop = asyncio.get_running_loop()
    c = _async_clients.get(loop)
    if c is None:
        # Loops closed without shutting down their generators: drop their clients.
        for old_loop, old in list(_async_clients.items()):
            if old_loop.is_closed():
                old._abandon()
                _async_clients.pop(old_loop, None)
        c = AsyncClient(**_settings)
        _async_clients[loop] = c
        lifetime = _closed_with_loop(c)
        c._lifetime = lifetime  # type: ignore[attr-defined]
        await lifetime.asend(None)
    return c


async def get_user_api_key(
    user_id: Id,
    service: str,
    *,
    redis_client: Any = None,
    channel_id: Optional[Id] = None,
    fallback_to_pool: bool = True,
    config: Any = None,
) -> str | None:
    """The key to use for ``user_id`` and ``service``: the user's own, else the
    channel's pool, else the global pool (when ``fallback_to_pool``), else the
    operator's default. None when there is none. An ``apikeyd.Key``: a ``str``
    with ``.source``, ``.key_id``, ``.degraded`` and ``.warning``."""
    r = await (await _aclient()).get_user_api_key(
        user_id=user_id, service=service, channel_id=channel_id, fallback_to_pool=fallback_to_pool
    )
    return Key.from_result(r)


async def get_gitea_credentials(
    user_id: Id,
    *,
    redis_client: Any = None,
    channel_id: Optional[Id] = None,
    fallback_to_pool: bool = True,
    config: Any = None,
) -> tuple[str, str] | None:
    """``(token, base_url)`` for Gitea, or None when either is missing."""
    r = await (await _aclient()).get_gitea_credentials(
        user_id=user_id, channel_id=channel_id, fallback_to_pool=fallback_to_pool
    )
    token, base_url = r.get("token"), r.get("base_url")
    if token is None or base_url is None:
        return None
    return token, base_url


async def get_pool_api_key(service: str, *, redis_client: Any = None) -> str | None:
    """A key of the global pool for ``service``, or None."""
    r = await (await _aclient()).get_pool_api_key(service=service)
    return Key.from_result({**r, "source": "global_pool"})


async def get_channel_pool_api_key(channel_id: Id, service: str, *, redis_client: Any = None) -> str | None:
    """A key of ``channel_id``'s pool for ``service``, or None."""
    r = await (await _aclient()).get_channel_pool_api_key(channel_id=channel_id, service=service)
    return Key.from_result({**r, "source": "channel_pool"})


async def check_default_key_limit(user_id: Id, tool_name: str, redis_client: Any, daily_limit: Optional[int] = None) -> tuple[bool, int, int]:
    """``(allowed, current_count, daily_limit)`` for today's uses of the operator's
    key, as an ``apikeyd.LimitCheck`` (with ``.degraded``: True when the quota store
    could not be read, so the count is not today's). Without ``daily_limit`` the
    daemon's ``quota.daily_limit`` applies (default 20, the original's)."""
    r = await (await _aclient()).check_default_key_limit(user_id=user_id, tool_name=tool_name, daily_limit=daily_limit)
    return LimitCheck.from_result(r)


async def increment_default_key_usage(user_id: Id, tool_name: str, redis_client: Any) -> None:
    """Counts one use of the operator's key (raises Unavailable when the quota store is down)."""
    await (await _aclient()).increment_default_key_usage(user_id=user_id, tool_name=tool_name)


async def consume_default_key_usage(user_id: Id, tool_name: str, redis_client: Any = None, daily_limit: Optional[int] = None) -> tuple[bool, int, int]:
    """(apikeyd addition) Atomic check-and-increment: ``(allowed, count_after, daily_limit)``
    as an ``apikeyd.LimitCheck``. Prefer it to check + increment, which can let two
    concurrent calls both pass. Applied exactly once, also across daemon restarts."""
    r = await (await _aclient()).consume_default_key_usage(user_id=user_id, tool_name=tool_name, daily_limit=daily_limit)
    return LimitCheck.from_result(r)


def _ask_daemon(service: str) -> str:
    # In the Messages worker thread only: a short-lived client of its own.
    with Client(_settings["socket"], timeout=2.0, connect_timeout=0.5) as c:
        return str(c.missing_api_key_error(service=service)["message"])


#: The missing-key texts: built in, then the daemon's as learnt in the background.
messages = Messages(_ask_daemon)


def missing_api_key_error(service: str) -> str:
    """The message telling a user that no key for ``service`` is available and how to
    set one. No I/O: computed from the daemon's service table (display names, signup
    URLs; the operator's ``[services.*]`` learnt in a background thread), so it
    returns at once even with the daemon down, and never raises."""
    try:
        return messages.missing(service)
    except Exception:
        return GENERIC_MISSING


def default_key_limit_error(tool_name: str, current: int, limit: int) -> str:
    """The message telling a user they reached today's limit on the operator's key:
    the daemon's text, computed here without I/O; never raises."""
    return limit_text(tool_name, current, limit)


async def set_user_api_key(user_id: Id, service: str, api_key: str, *, redis_client: Any = None) -> bool:
    """Stores ``api_key`` as the user's own key for ``service`` (durable on return)."""
    r = await (await _aclient()).set_user_api_key(user_id=user_id, service=service, key=api_key)
    return bool(r.get("stored"))


async def delete_user_api_key(user_id: Id, service: str, *, redis_client: Any = None) -> bool:
    """Deletes the user's own key for ``service``; False when there was none."""
    r = await (await _aclient()).delete_user_api_key(user_id=user_id, service=service)
    return bool(r.get("deleted"))


async def list_user_api_keys(user_id: Id, *, redis_client: Any = None) -> List[Dict[str, Any]]:
    """The user's keys, masked: ``[{"service", "masked", "updated_at"}, ...]``."""
    r = await (await _aclient()).list_user_api_keys(user_id=user_id)
    return list(r.get("keys") or [])


async def report_key_result(
    service: str,
    outcome: str,
    *,
    key_id: Optional[str] = None,
    user_id: Optional[Id] = None,
    channel_id: Optional[Id] = None,
    retry_after_s: Optional[int] = None,
    redis_client: Any = None,
) -> Dict[str, Any]:
    """Tells the daemon how a key fared with the provider (``"ok"``,
    ``"rate_limited"``, ``"unauthorized"``, ``"error"``), for a pool key
    (``key_id``, from the answer that handed it out) or a user's own key
    (``user_id``). Returns ``{"recorded", "state", "cooling_until"}``."""
    return dict(await (await _aclient()).report_key_result(
        service=service,
        outcome=outcome,
        key_id=key_id,
        user_id=user_id,
        channel_id=channel_id,
        retry_after_s=retry_after_s,
    ))
