"""Request encoding, response decoding and the op tables shared by both clients."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

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
        "reload",
    }
)

#: Error codes that, with ``id`` null, come just before the daemon closes the
#: connection: a line too long, a refused peer, or a client past max_connections.
CLOSING_CODES = frozenset({"too_large", "forbidden", "unavailable"})

_ID_PARAMS = ("user_id", "channel_id")

_encode = json.JSONEncoder(separators=(",", ":")).encode
_raw_decode = json.JSONDecoder().raw_decode

# Encoded read requests without their id, by (op, parameters): a bot asks for the
# same few (user, service) pairs again and again. Only reads are kept (their lines
# hold no key material); the cache is dropped whole when it grows past its bound.
_line_cache: Dict[Any, bytes] = {}
_LINE_CACHE_MAX = 4096




def encode_request(op: str, rid: int, params: Dict[str, Any]) -> bytes:
    """One request line. ``None`` parameters are left out; non-negative integer
    user/channel ids (Discord snowflakes) become their decimal strings."""
    if op in READ_OPS:
        try:
            ck = (op, *params.items())
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


def decode_response(line: bytes, rid: int) -> Tuple[bool, Any, bool]:
    """``(True, result, False)`` or ``(False, Error, closing)`` for one response line;
    ``closing`` says the daemon closes the connection after it (``too_large``, or a
    ``forbidden`` that refuses the peer itself: both come with ``id`` null).

    Raises ProtocolDesync when the line is not a response to request ``rid`` (an
    answer with ``id`` null is taken as the daemon's answer to a line it could not
    read, or to a refused peer).
    """
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
    if back != rid and back is not None:
        raise ProtocolDesync("a response came back for another request")
    if resp.get("ok") is True:
        if back is None:
            raise ProtocolDesync("a success answer without the request's id")
        return True, resp.get("result"), False
    err = error_from_wire(resp.get("error"))
    return False, err, back is None and err.code in CLOSING_CODES


def desync_error() -> Error:
    return Internal("the connection to apikeyd lost track of its responses; it was closed")
