"""Request encoding, response decoding and the op tables shared by both clients."""

from __future__ import annotations

import json
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ._errors import Error, Internal, error_from_wire

from ._discover import DEFAULT_SOCKET

#: Ops that change state. After a broken connection they are sent again only when
#: the request provably never reached the daemon.
WRITE_OPS = frozenset(
    {
        "set_user_api_key",
        "delete_user_api_key",
        "add_pool_key",
        "remove_pool_key",
        "increment_default_key_usage",
        "consume_default_key_usage",
        "report_key_result",
        "enable_pool_key",
    }
)

#: Ops that are safe to send again after a broken connection. An op in neither set
#: (a newer daemon's op called through ``call``) is treated as a write.
READ_OPS = frozenset(
    {
        "ping",
        "get_user_api_key",
        "get_gitea_credentials",
        "get_pool_api_key",
        "get_channel_pool_api_key",
        "list_user_api_keys",
        "list_pool_keys",
        "check_default_key_limit",
        "missing_api_key_error",
        "default_key_limit_error",
        "stats",
        "metrics",
        "reload",
    }
)

#: Error codes that, with ``id`` null, come just before the daemon closes the
#: connection: a refused peer, or a client past max_connections. (``too_large`` keeps
#: the connection: the daemon skips the line and reads the next.)
CLOSING_CODES = frozenset({"forbidden", "unavailable"})

_ID_PARAMS = ("user_id", "channel_id")

#: The daemon's default ``server.max_line_bytes``; a longer request line is refused
#: by the client before it is sent (the daemon would answer ``too_large``).
DEFAULT_MAX_LINE_BYTES = 65536

_encode = json.JSONEncoder(separators=(",", ":")).encode
_raw_decode = json.JSONDecoder().raw_decode

# Encoded read requests without their id, by (op, parameters): a bot asks for the
# same few (user, service) pairs again and again. Only reads are kept (their lines
# hold no key material); the cache is dropped whole when it grows past its bound.
# The key holds each value's type beside it: True == 1 == 1.0 in Python, but the
# daemon reads `true`, `1` and `1.0` differently, so they must never share a line.
_line_cache: Dict[Any, bytes] = {}
_LINE_CACHE_MAX = 4096


def _cache_key(op: str, params: Dict[str, Any]) -> Any:
    key: List[Any] = [op]
    for name, value in params.items():
        key.append(name)
        key.append(type(value))
        key.append(value)
    return tuple(key)


def encode_request(op: str, rid: int, params: Dict[str, Any]) -> bytes:
    """One request line. ``None`` parameters are left out; non-negative integer
    user/channel ids (Discord snowflakes) become their decimal strings."""
    if op in READ_OPS:
        try:
            ck = _cache_key(op, params)
            head = _line_cache.get(ck)
        except TypeError:  # an unhashable parameter value
            ck, head = None, None
        if head is None:
            head = _encode_body(op, params)[:-1]  # without the closing brace
            if ck is not None:
                if len(_line_cache) >= _LINE_CACHE_MAX:
                    _line_cache.clear()
                _line_cache[ck] = head
        return head + b',"id":%d}\n' % rid
    body = _encode_body(op, params)
    return body[:-1] + b',"id":%d}\n' % rid


def _encode_body(op: str, params: Dict[str, Any]) -> bytes:
    body: Dict[str, Any] = {"op": op}
    for name, value in params.items():
        if value is None:
            continue
        if (
            name in _ID_PARAMS
            and type(value) is int  # not bool
            and value >= 0
        ):
            value = str(value)
        body[name] = value
    return _encode(body).encode("utf-8")


class ProtocolDesync(Exception):
    """A response did not match its request: the connection must be dropped."""


class Reply(NamedTuple):
    """One decoded response line. ``ok``: success (``value`` is the result) or an
    error answer (``value`` is the apikeyd.Error). ``replayed``: the daemon answered
    a repeated idempotency key with the first answer. ``closing``: the daemon closes
    the connection after it (a refused peer, past max_connections: ``id`` null).
    ``not_applied``: an error answer that says the request was not run (a daemon
    shutting down: ``"applied": false``)."""

    rid: Optional[int]
    ok: bool
    value: Any
    replayed: bool
    closing: bool
    not_applied: bool


def decode_line(line: bytes) -> Reply:
    """Decodes one response line; raises ProtocolDesync when it is not a response."""
    try:
        text = line.decode("utf-8")
        resp, end = _raw_decode(text)
    except ValueError:
        raise ProtocolDesync("the daemon sent a line that is not JSON") from None
    if end != len(text) and not text[end:].isspace():
        raise ProtocolDesync("the daemon sent a line that is not one JSON value")
    if type(resp) is not dict:
        raise ProtocolDesync("the daemon sent a line that is not an object")
    back = resp.get("id")
    if back is not None and type(back) is not int:
        raise ProtocolDesync("a response came back for another request")
    if resp.get("ok") is True:
        return Reply(back, True, resp.get("result"), resp.get("replayed") is True, False, False)
    raw = resp.get("error")
    err = error_from_wire(raw)
    not_applied = isinstance(raw, dict) and raw.get("applied") is False
    closing = back is None and err.code in CLOSING_CODES
    return Reply(back, False, err, resp.get("replayed") is True, closing, not_applied)


def decode_response(line: bytes, rid: int) -> Tuple[bool, Any, bool]:
    """``(True, result, False)`` or ``(False, Error, closing)`` for one response line
    to request ``rid`` (an answer with ``id`` null is taken as the daemon's answer
    to a line it could not read, or to a refused peer). Raises ProtocolDesync when
    the line is not a response to request ``rid``."""
    r = decode_line(line)
    if r.rid != rid and r.rid is not None:
        raise ProtocolDesync("a response came back for another request")
    if r.ok and r.rid is None:
        raise ProtocolDesync("a success answer without the request's id")
    return r.ok, r.value, r.closing


def desync_error() -> Error:
    return Internal("the connection to apikeyd lost track of its responses; it was closed")
