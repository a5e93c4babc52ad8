"""What goes on the wire: parameters, integer ids, the new ops' members."""

from __future__ import annotations

import asyncio

import apikeyd
from apikeyd._wire import READ_OPS, WRITE_OPS, encode_request
from fake_daemon import FakeDaemon


def test_encoding_drops_none_and_stringifies_non_negative_int_ids():
    line = encode_request("get_user_api_key", 7, {"user_id": 123456789012345678, "service": "openai",
                                                  "channel_id": None, "fallback_to_pool": False})
    assert line == b'{"op":"get_user_api_key","user_id":"123456789012345678","service":"openai","fallback_to_pool":false,"id":7}\n'
    # the cached head of a read gets each call's own id
    again = encode_request("get_user_api_key", 8, {"user_id": 123456789012345678, "service": "openai",
                                                   "channel_id": None, "fallback_to_pool": False})
    assert again == line.replace(b'"id":7', b'"id":8')
    assert encode_request("set_user_api_key", 9, {"user_id": 1, "service": "s", "key": "k"}) == \
        b'{"op":"set_user_api_key","user_id":"1","service":"s","key":"k","id":9}\n'
    assert encode_request("ping", 3, {}) == b'{"op":"ping","id":3}\n'
    # bools and negative ints are not ids to convert; the daemon judges them
    assert b'"user_id":true' in encode_request("x", 1, {"user_id": True})
    assert b'"user_id":-5' in encode_request("x", 1, {"user_id": -5})
    assert b'"channel_id":"0"' in encode_request("x", 1, {"channel_id": 0})


def test_every_write_op_is_a_write_and_reads_are_reads():
    assert WRITE_OPS == {"set_user_api_key", "delete_user_api_key", "add_pool_key", "remove_pool_key",
                         "increment_default_key_usage", "consume_default_key_usage", "report_key_result",
                         "enable_pool_key"}
    assert not (READ_OPS & WRITE_OPS)
    methods = {n for n in dir(apikeyd.Client) if not n.startswith("_")} - {"call", "close", "timeout"}
    assert methods == READ_OPS | WRITE_OPS
    amethods = {n for n in dir(apikeyd.AsyncClient) if not n.startswith("_")} - {"call", "close", "aclose", "timeout"}
    assert amethods == methods


def test_new_ops_send_the_members_of_issues_12_and_14():
    fake = FakeDaemon(["answer"])
    try:
        c = apikeyd.Client(fake.path)
        c.report_key_result(service="openai", outcome="rate_limited", key_id="ab", channel_id=5, retry_after_s=30)
        c.report_key_result(service="openai", outcome="unauthorized", user_id=99)
        c.enable_pool_key(service="openai", key_id="ab", channel_id="c")
        c.default_key_limit_error(tool_name="t", current=1, limit=2, service="openai")

        async def main():
            a = apikeyd.AsyncClient(fake.path)
            await a.enable_pool_key(service="openai", key_id="cd")
            await a.close()

        asyncio.run(main())
        seen = [{k: v for k, v in r.items() if k not in ("id", "idempotency_key")} for r in fake.seen]
        assert seen == [
            {"op": "report_key_result", "service": "openai", "outcome": "rate_limited", "key_id": "ab",
             "channel_id": "5", "retry_after_s": 30},
            {"op": "report_key_result", "service": "openai", "outcome": "unauthorized", "user_id": "99"},
            {"op": "enable_pool_key", "service": "openai", "key_id": "ab", "channel_id": "c"},
            {"op": "default_key_limit_error", "tool_name": "t", "current": 1, "limit": 2, "service": "openai"},
            {"op": "enable_pool_key", "service": "openai", "key_id": "cd"},
        ]
    finally:
        fake.close()
