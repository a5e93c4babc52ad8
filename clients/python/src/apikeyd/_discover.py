"""Finding the daemon's socket as the ``apikeyd`` command line does (no I/O but a
stat and reading one small config file).

Order: the ``socket`` argument; else ``$APIKEYD_SOCKET``; else ``server.socket`` of
the config ``$APIKEYD_CONFIG`` names, or of ``./config.toml`` when it exists (a
relative path is taken from the config's folder, as the daemon does, and the
daemon's default ``run/apikeyd.sock`` applies when the file has no
``server.socket``); else ``/run/apikeyd/apikeyd.sock`` (the systemd unit's).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

__all__ = ["DEFAULT_SOCKET", "Discovery", "discover"]

DEFAULT_SOCKET = "/run/apikeyd/apikeyd.sock"
#: The daemon's own default for ``server.socket`` (relative to the config's folder).
CONFIG_DEFAULT_SOCKET = "run/apikeyd.sock"


class Discovery:
    """The path chosen and, for error messages, every place looked at."""

    __slots__ = ("path", "looked")

    def __init__(self, path: str, looked: List[str]) -> None:
        self.path = path
        self.looked = looked

    def where(self) -> str:
        return "; ".join(self.looked)


def _config_socket(config: str) -> Optional[str]:
    """``server.socket`` of the TOML file at ``config`` (the daemon's default when
    absent), resolved against its folder; None when the file cannot be read."""
    try:
        with open(config, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    socket = _toml_server_socket(raw)
    if socket is None:
        socket = CONFIG_DEFAULT_SOCKET
    base = os.path.dirname(config) or "."
    return os.path.abspath(os.path.join(base, socket))


def _toml_server_socket(raw: bytes) -> Optional[str]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        return _scan_server_socket(raw.decode("utf-8", "replace"))
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    server = doc.get("server")
    value = server.get("socket") if isinstance(server, dict) else None
    return value if isinstance(value, str) else None


def _scan_server_socket(text: str) -> Optional[str]:
    """``socket = "..."`` under ``[server]`` (or ``server.socket = "..."`` at the
    top), for Pythons without tomllib; simple quoted strings only."""
    table = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            table = line.strip("[] ")
            continue
        key, eq, value = line.partition("=")
        if not eq:
            continue
        key, value = key.strip(), value.strip()
        if (table, key) in (("server", "socket"), ("", "server.socket")) and value[:1] in ('"', "'"):
            q = value[0]
            end = value.find(q, 1)
            if end > 0:
                return value[1:end]
    return None


def discover(socket: "Optional[Union[str, os.PathLike[str]]]" = None) -> Discovery:
    """Where the daemon's socket is; see the module docstring."""
    if socket is not None:
        path = os.fspath(socket)
        return Discovery(path, [f"{path} (the socket argument)"])
    looked: List[str] = ["no socket argument"]
    env = os.environ.get("APIKEYD_SOCKET")
    if env:
        return Discovery(env, looked + [f"{env} ($APIKEYD_SOCKET)"])
    looked.append("$APIKEYD_SOCKET unset")
    config_env = os.environ.get("APIKEYD_CONFIG")
    candidates: List[Tuple[str, str]] = []
    if config_env:
        candidates.append((config_env, "$APIKEYD_CONFIG"))
    else:
        looked.append("$APIKEYD_CONFIG unset")
        candidates.append(("config.toml", "./config.toml"))
    for config, what in candidates:
        found = _config_socket(config)
        if found is not None:
            return Discovery(found, looked + [f"{found} (server.socket of {what} {os.path.abspath(config)})"])
        looked.append(f"no readable config at {os.path.abspath(config)} ({what})")
    return Discovery(DEFAULT_SOCKET, looked + [f"{DEFAULT_SOCKET} (the default)"])
