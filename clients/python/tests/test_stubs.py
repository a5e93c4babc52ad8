"""The clients' typed method stubs (client.pyi, aio.pyi) are current, shipped, and
give each op its own result type to mypy --strict."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import apikeyd

HERE = Path(__file__).resolve().parent
TOOLS = HERE.parent / "tools"
SRC = HERE.parent / "src" / "apikeyd"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_stubs", TOOLS / "gen_stubs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_stubs_are_current_and_installed():
    for name, text in _generator().stubs().items():
        assert (SRC / name).read_text() == text, f"{name} is stale: run python clients/python/tools/gen_stubs.py"
        assert (Path(apikeyd.__file__).parent / name).read_text() == text


def test_mypy_strict_sees_each_result_type(tmp_path):
    use = tmp_path / "use.py"
    use.write_text(textwrap.dedent('''
        import apikeyd
        import apikeyd.manage_api_keys

        def sync() -> None:
            kd = apikeyd.Client()
            r = kd.get_user_api_key(user_id=1, service="openai")
            key: "str | None" = r["key"]
            n: int = kd.consume_default_key_usage(user_id="a", tool_name="t")["current_count"]
            wrong: int = r["source"]

        async def aio() -> None:
            a = apikeyd.AsyncClient()
            ok: bool = (await a.check_default_key_limit(user_id=1, tool_name="t"))["allowed"]
            k = await apikeyd.manage_api_keys.get_user_api_key(1, "openai")
    '''))
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(use)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "use.py:10:" in errors[0] and '"str | None"' in errors[0], r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "-p", "apikeyd"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
