"""The drop-in module: signatures exactly as the original's, and behaviour."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import apikeyd
from apikeyd import manage_api_keys as m

KEY = "sk-user-SECRET-0123456789abcdef"
POOL_KEY = "sk-pool-SECRET-9876543210fedcba"

P = inspect.Parameter
PK, KW = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY
E = P.empty

# name -> (is async, [(param, kind, default)], return annotation), as the original module declares them.
ORIGINAL = {
    "get_user_api_key": (True, [("user_id", PK, E), ("service", PK, E), ("redis_client", KW, None),
                                ("channel_id", KW, None), ("fallback_to_pool", KW, True), ("config", KW, None)],
                         "str | None"),
    "get_gitea_credentials": (True, [("user_id", PK, E), ("redis_client", KW, None), ("channel_id", KW, None),
                                     ("fallback_to_pool", KW, True), ("config", KW, None)],
                              "tuple[str, str] | None"),
    "get_pool_api_key": (True, [("service", PK, E), ("redis_client", KW, None)], "str | None"),
    "get_channel_pool_api_key": (True, [("channel_id", PK, E), ("service", PK, E), ("redis_client", KW, None)],
                                 "str | None"),
    "check_default_key_limit": (True, [("user_id", PK, E), ("tool_name", PK, E), ("redis_client", PK, E),
                                       ("daily_limit", PK, None)], "tuple[bool, int, int]"),
    "increment_default_key_usage": (True, [("user_id", PK, E), ("tool_name", PK, E), ("redis_client", PK, E)],
                                    "None"),
    "missing_api_key_error": (False, [("service", PK, E)], "str"),
    "default_key_limit_error": (False, [("tool_name", PK, E), ("current", PK, E), ("limit", PK, E)], "str"),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_signature_matches_the_original(name):
    is_async, params, ret = ORIGINAL[name]
    f = getattr(m, name)
    assert inspect.iscoroutinefunction(f) is is_async
    sig = inspect.signature(f)
    got = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    assert got == params
    assert sig.return_annotation == ret


@pytest.fixture
def configured(daemon):
    m.configure(daemon.socket)
    yield daemon
    m.configure(None)


def test_drop_in_functions(configured):
    async def main():
        assert await m.get_user_api_key(42, "openai", fallback_to_pool=False) is None
        assert await m.set_user_api_key(42, "openai", KEY) is True
        assert await m.get_user_api_key(42, "openai", redis_client=object(), config={"x": 1}) == KEY
        assert await m.get_user_api_key("42", "openai", channel_id=7) == KEY
        assert [k["service"] for k in await m.list_user_api_keys(42)] == ["openai"]
        assert await m.delete_user_api_key(42, "openai") is True
        assert await m.delete_user_api_key(42, "openai") is False

        assert await m.get_gitea_credentials(42) is None
        await m.set_user_api_key(42, "gitea", "gitea-token-abcdef0123")
        assert await m.get_gitea_credentials(42) == ("gitea-token-abcdef0123", "https://gitea.example.test")

        admin = configured.aclient()
        await admin.add_pool_key(service="openai", key=POOL_KEY)
        await admin.add_pool_key(service="openai", key="sk-chan-0000111122223333", channel_id="9")
        await admin.close()
        assert await m.get_pool_api_key("openai") == POOL_KEY
        assert await m.get_channel_pool_api_key(9, "openai") == "sk-chan-0000111122223333"
        assert await m.get_channel_pool_api_key(10, "openai") is None
        assert await m.get_user_api_key(43, "openai", channel_id=9) == "sk-chan-0000111122223333"
        assert await m.get_user_api_key(43, "openai") == POOL_KEY

        assert await m.check_default_key_limit(43, "web", None) == (True, 0, 20)
        assert await m.increment_default_key_usage(43, "web", None) is None
        assert await m.check_default_key_limit(43, "web", None, daily_limit=1) == (False, 1, 1)
        assert await m.consume_default_key_usage(43, "web", None, daily_limit=3) == (True, 2, 3)

    asyncio.run(main())
    # a second event loop gets its own connections
    assert asyncio.run(m.get_pool_api_key("openai")) == POOL_KEY

    assert "set_user_api_key openai" in m.missing_api_key_error("openai")
    assert "OpenAI" in m.missing_api_key_error("openai")
    msg = m.default_key_limit_error("web", 20, 20)
    assert "web" in msg and "20" in msg and "00:00 UTC" in msg


def test_message_functions_work_without_a_daemon(tmp_path):
    m.configure(str(tmp_path / "none.sock"), connect_timeout=0.1)
    try:
        assert "set_user_api_key openai" in m.missing_api_key_error("openai")
        assert "web" in m.default_key_limit_error("web", 3, 3)
        with pytest.raises(apikeyd.DaemonUnreachable):
            asyncio.run(m.get_user_api_key(1, "openai"))
    finally:
        m.configure(None)
