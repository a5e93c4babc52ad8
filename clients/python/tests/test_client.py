"""Every op through the blocking Client, in embedded and Redis mode."""

from __future__ import annotations

import threading

import pytest

import apikeyd

KEY = "sk-user-SECRET-0123456789abcdef"
POOL_KEY = "sk-pool-SECRET-9876543210fedcba"
SNOWFLAKE = 123456789012345678


def test_every_op(daemon):
    c = daemon.client()
    assert c.ping()["pong"] is True

    assert c.set_user_api_key(user_id="ana", service="OpenAI", key=KEY) == {"stored": True}
    r = c.get_user_api_key(user_id="ana", service="openai")
    assert (r["key"], r["source"]) == (KEY, "user")
    keys = c.list_user_api_keys(user_id="ana")["keys"]
    assert [k["service"] for k in keys] == ["openai"]
    assert KEY not in repr(keys)

    add = c.add_pool_key(service="openai", key=POOL_KEY, label="donated")
    assert add["added"] is True and len(add["key_id"]) == 16
    assert c.add_pool_key(service="openai", key=POOL_KEY)["added"] is False
    assert c.get_pool_api_key(service="openai")["key"] == POOL_KEY
    r = c.get_user_api_key(user_id="bo", service="openai")
    assert (r["key"], r["source"]) == (POOL_KEY, "global_pool")
    listed = c.list_pool_keys(service="openai")["keys"]
    assert [k["key_id"] for k in listed] == [add["key_id"]] and listed[0]["label"] == "donated"

    ch = c.add_pool_key(service="openai", key="sk-chan-0000111122223333", channel_id="c1")
    assert c.get_channel_pool_api_key(channel_id="c1", service="openai")["key"] == "sk-chan-0000111122223333"
    assert c.get_user_api_key(user_id="bo", service="openai", channel_id="c1")["source"] == "channel_pool"
    assert c.get_user_api_key(user_id="bo", service="openai", fallback_to_pool=False,
                              fallback_to_config=False)["key"] is None
    assert c.list_pool_keys(service="openai", channel_id="c1")["keys"][0]["key_id"] == ch["key_id"]
    assert c.remove_pool_key(service="openai", key_id=ch["key_id"], channel_id="c1") == {"removed": True}
    assert c.get_channel_pool_api_key(channel_id="c1", service="openai")["key"] is None
    assert c.remove_pool_key(service="openai", key_id=add["key_id"])["removed"] is True
    assert c.get_pool_api_key(service="openai")["key"] is None

    r = c.get_user_api_key(user_id="bo", service="defaultsvc")
    assert (r["key"], r["source"]) == ("sk-operator-default-000111", "config")
    r = c.get_user_api_key(user_id="bo", service="anthropic", fallback_to_config=False)
    assert r["key"] is None and "set_user_api_key anthropic" in r["message"]

    c.set_user_api_key(user_id="ana", service="gitea", key="gitea-token-abcdef0123")
    g = c.get_gitea_credentials(user_id="ana")
    assert (g["token"], g["base_url"], g["source"]) == ("gitea-token-abcdef0123", "https://gitea.example.test", "user")
    assert c.get_gitea_credentials(user_id="nobody", fallback_to_pool=False, fallback_to_config=False)["token"] is None

    assert c.check_default_key_limit(user_id="bo", tool_name="web", daily_limit=2) == {
        "allowed": True, "current_count": 0, "daily_limit": 2}
    assert c.increment_default_key_usage(user_id="bo", tool_name="web") == {"count": 1}
    assert c.consume_default_key_usage(user_id="bo", tool_name="web", daily_limit=2)["current_count"] == 2
    denied = c.consume_default_key_usage(user_id="bo", tool_name="web", daily_limit=2)
    assert (denied["allowed"], denied["current_count"]) == (False, 2)
    assert c.check_default_key_limit(user_id="bo", tool_name="web")["daily_limit"] == 20

    assert "set_user_api_key openai" in c.missing_api_key_error(service="openai")["message"]
    msg = c.default_key_limit_error(tool_name="web", current=20, limit=20)["message"]
    assert "web" in msg and "20" in msg

    assert c.delete_user_api_key(user_id="ana", service="openai") == {"deleted": True}
    assert c.delete_user_api_key(user_id="ana", service="openai") == {"deleted": False}
    assert c.reload()["reloaded"] is True
    st = c.stats()
    assert st["store"]["mode"] == daemon.mode and st["requests_total"] > 0

    # the generic call reaches the same ops
    assert c.call("ping")["pong"] is True
    assert c.call("get_user_api_key", user_id="ana", service="gitea")["source"] == "user"
    c.close()


def test_integer_ids_are_sent_as_decimal_strings(daemon):
    c = daemon.client()
    c.set_user_api_key(user_id=SNOWFLAKE, service="openai", key=KEY)
    assert c.get_user_api_key(user_id=str(SNOWFLAKE), service="openai")["key"] == KEY
    assert c.get_user_api_key(user_id=SNOWFLAKE, service="openai", channel_id=987654321098765432)["key"] == KEY
    c.add_pool_key(service="openai", key=POOL_KEY, channel_id=42)
    assert c.get_channel_pool_api_key(channel_id="42", service="openai")["key"] == POOL_KEY
    assert c.increment_default_key_usage(user_id=SNOWFLAKE, tool_name="t") == {"count": 1}
    assert c.check_default_key_limit(user_id=str(SNOWFLAKE), tool_name="t")["current_count"] == 1


def test_socket_from_environment(daemon, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./config.toml here
    monkeypatch.delenv("APIKEYD_CONFIG", raising=False)
    monkeypatch.setenv("APIKEYD_SOCKET", daemon.socket)
    assert apikeyd.Client().socket_path == daemon.socket
    assert apikeyd.Client().ping()["pong"] is True
    monkeypatch.delenv("APIKEYD_SOCKET")
    assert apikeyd.Client().socket_path == "/run/apikeyd/apikeyd.sock"
    monkeypatch.setenv("APIKEYD_CONFIG", daemon.config)  # the daemon's own config
    assert apikeyd.Client().socket_path == daemon.socket
    assert apikeyd.Client().ping()["pong"] is True


def test_threads_share_one_client_and_writes_are_exact(daemon):
    c = daemon.client()
    c.set_user_api_key(user_id="ana", service="openai", key=KEY)
    errors = []
    threads_n, calls = 16, 100

    def work(n: int) -> None:
        try:
            for i in range(calls):
                assert c.get_user_api_key(user_id="ana", service="openai")["key"] == KEY
                assert c.increment_default_key_usage(user_id="shared", tool_name="t")["count"] >= 1
                assert c.ping()["pong"] is True
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    assert c.check_default_key_limit(user_id="shared", tool_name="t", daily_limit=10**6)["current_count"] == threads_n * calls


def test_no_key_in_repr_or_errors(daemon):
    c = daemon.client()
    c.set_user_api_key(user_id="ana", service="openai", key=KEY)
    assert KEY not in repr(c) and KEY not in str(c)
    try:
        c.set_user_api_key(user_id="ana", service="bad service!", key=KEY)
    except apikeyd.BadRequest as e:
        assert KEY not in str(e) and KEY not in repr(e) and KEY not in e.message
    else:
        pytest.fail("a bad service was accepted")
    try:
        c.set_user_api_key(user_id="ana", service="openai", key=KEY + "\x01")
    except apikeyd.BadRequest as e:
        assert KEY not in str(e) and KEY not in repr(e)
    else:
        pytest.fail("a key with a control character was accepted")
