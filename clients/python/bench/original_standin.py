"""STAND-IN for the original ``tools.manage_api_keys`` module, for the bench only.

This is NOT the original module's code, which is not part of this repository. It is
reconstructed from what is known of the original's behaviour, to measure in the same
process and the same rounds what that behaviour costs per call:

- a per-user key lives in a SQLite table, encrypted at rest; every
  ``get_user_api_key`` runs one SQLite query and decrypts the stored value
  (here with ``cryptography``'s Fernet);
- a pool is a Redis hash ``{prefix}:global_api_pool:{service}`` (field = key id,
  value = the key in clear, the layout ``apikeyd import-legacy`` reads); every
  ``get_pool_api_key`` is one Redis round trip (``HVALS``) and a uniformly random
  pick among the values;
- per-user daily counters are Redis strings: ``check_default_key_limit`` is one
  ``GET``, ``increment_default_key_usage`` one ``INCR`` and ``EXPIRE`` (sent together
  in one pipeline, one round trip).

Where the original's details are unknown, the cheaper choice is taken, so the
stand-in is not slower than the original is likely to have been: the standard
library's ``sqlite3`` called in the coroutine (no thread hop) on one connection
opened once and kept (not one per call), ``INCR`` and ``EXPIRE`` in one round trip
(not two), no logging. The function signatures are those listed in
docs/python.md; ``redis_client`` is a ``redis.asyncio.Redis``, as the original
received from the bot.

``cryptography`` and ``redis`` are bench-only dependencies (clients/python/bench/run.sh
installs them into the bench's own virtualenv); the apikeyd package never imports
this file.
"""

from __future__ import annotations

import datetime
import random
import sqlite3
from typing import Any, Optional, Tuple

from cryptography.fernet import Fernet

PREFIX = "stargazer"
DAILY_LIMIT = 20


class _Store:
    """The SQLite store of per-user keys and its Fernet key (module state, as the
    original kept it)."""

    def __init__(self) -> None:
        self.db: Optional[sqlite3.Connection] = None
        self.fernet: Optional[Fernet] = None


_store = _Store()


def open_store(path: str, fernet_key: bytes) -> None:
    """Opens (creating when needed) the per-user key table at ``path``."""
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute(
        "CREATE TABLE IF NOT EXISTS user_api_keys ("
        " user_id TEXT NOT NULL, service TEXT NOT NULL, encrypted_key BLOB NOT NULL,"
        " updated_at INTEGER NOT NULL, PRIMARY KEY (user_id, service))"
    )
    db.commit()
    _store.db = db
    _store.fernet = Fernet(fernet_key)


def close_store() -> None:
    if _store.db is not None:
        _store.db.close()
    _store.db = None
    _store.fernet = None


def store_user_key(user_id: Any, service: str, api_key: str) -> None:
    """Setup only: encrypts and stores one user's key."""
    assert _store.db is not None and _store.fernet is not None
    token = _store.fernet.encrypt(api_key.encode())
    _store.db.execute(
        "INSERT OR REPLACE INTO user_api_keys (user_id, service, encrypted_key, updated_at)"
        " VALUES (?, ?, ?, strftime('%s','now'))",
        (str(user_id), service, token),
    )
    _store.db.commit()


async def get_user_api_key(
    user_id: Any,
    service: str,
    *,
    redis_client: Any = None,
    channel_id: Any = None,
    fallback_to_pool: bool = True,
    config: Any = None,
) -> Optional[str]:
    """One SQLite query and one decrypt; the pool when the user has no key."""
    assert _store.db is not None and _store.fernet is not None
    row = _store.db.execute(
        "SELECT encrypted_key FROM user_api_keys WHERE user_id = ? AND service = ?",
        (str(user_id), service),
    ).fetchone()
    if row is not None:
        return _store.fernet.decrypt(row[0]).decode()
    if fallback_to_pool and redis_client is not None:
        return await get_pool_api_key(service, redis_client=redis_client)
    return None


async def get_pool_api_key(service: str, *, redis_client: Any = None) -> Optional[str]:
    """One Redis round trip (HVALS of the pool's hash), then a uniform random pick."""
    values = await redis_client.hvals(f"{PREFIX}:global_api_pool:{service}")
    if not values:
        return None
    key = random.choice(values)
    return key.decode() if isinstance(key, bytes) else str(key)


def _usage_key(user_id: Any, tool_name: str) -> str:
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"{PREFIX}:default_key_usage:{user_id}:{tool_name}:{day}"


async def check_default_key_limit(
    user_id: Any, tool_name: str, redis_client: Any, daily_limit: int = DAILY_LIMIT
) -> Tuple[bool, int, int]:
    """One GET: ``(allowed, current_count, daily_limit)``."""
    raw = await redis_client.get(_usage_key(user_id, tool_name))
    current = int(raw) if raw is not None else 0
    return current < daily_limit, current, daily_limit


async def increment_default_key_usage(user_id: Any, tool_name: str, redis_client: Any) -> None:
    """INCR and EXPIRE (a day), sent in one pipeline: one round trip."""
    pipe = redis_client.pipeline(transaction=False)
    key = _usage_key(user_id, tool_name)
    pipe.incr(key)
    pipe.expire(key, 86400)
    await pipe.execute()
