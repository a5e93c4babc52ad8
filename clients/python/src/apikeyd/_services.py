"""The two message functions, computed here without I/O.

The daemon's texts (src/ops/messages.rs) depend only on the parameters and on the
service's display name and signup URL: the built-in table below (a copy of the
daemon's, which tests/test_messages.py checks against src/ops/services.rs), overridden
by the operator's ``[services.*]``. Those overrides are learnt from the daemon in a
background thread, one service at a time as they are asked for, so a caller (a
coroutine included) never waits for a socket: the first call for a service answers
from the built-in table, later ones with the daemon's own text once it came.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["BUILT_IN", "Messages", "missing_key_text", "limit_text", "GENERIC_MISSING"]

#: (display name, signup URL) of the services the daemon knows out of the box.
BUILT_IN: Dict[str, Tuple[str, str]] = {
    "openai": ("OpenAI", "https://platform.openai.com/api-keys"),
    "anthropic": ("Anthropic", "https://console.anthropic.com/settings/keys"),
    "gemini": ("Google Gemini", "https://aistudio.google.com/app/apikey"),
    "mistral": ("Mistral AI", "https://console.mistral.ai/api-keys"),
    "groq": ("Groq", "https://console.groq.com/keys"),
    "openrouter": ("OpenRouter", "https://openrouter.ai/keys"),
    "deepseek": ("DeepSeek", "https://platform.deepseek.com/api_keys"),
    "xai": ("xAI", "https://console.x.ai"),
    "cohere": ("Cohere", "https://dashboard.cohere.com/api-keys"),
    "perplexity": ("Perplexity", "https://www.perplexity.ai/settings/api"),
    "together": ("Together AI", "https://api.together.ai/settings/api-keys"),
    "fireworks": ("Fireworks AI", "https://fireworks.ai/account/api-keys"),
    "huggingface": ("Hugging Face", "https://huggingface.co/settings/tokens"),
    "replicate": ("Replicate", "https://replicate.com/account/api-tokens"),
    "elevenlabs": ("ElevenLabs", "https://elevenlabs.io/app/settings/api-keys"),
    "serpapi": ("SerpApi", "https://serpapi.com/manage-api-key"),
    "brave": ("Brave Search", "https://api-dashboard.search.brave.com/app/keys"),
    "tavily": ("Tavily", "https://app.tavily.com/home"),
    "exa": ("Exa", "https://dashboard.exa.ai/api-keys"),
    "github": ("GitHub", "https://github.com/settings/tokens"),
    "gitea": ("Gitea", ""),
    "wolframalpha": ("Wolfram|Alpha", "https://developer.wolframalpha.com/access"),
    "openweathermap": ("OpenWeatherMap", "https://home.openweathermap.org/api_keys"),
}

#: For a service name the daemon would refuse (e.g. ``"web search"``).
GENERIC_MISSING = (
    "No API key for this service is available to you. "
    "Get one from the provider, then set it with set_user_api_key."
)

_SERVICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

#: How long a text learnt from the daemon is used before it is asked again.
REFRESH_S = 300.0


def service_name(service: object) -> Optional[str]:
    """The daemon's form of ``service`` (lower-cased), or None when it would refuse it."""
    if type(service) is not str or not 1 <= len(service) <= 64:
        return None
    if not all(c in _SERVICE_CHARS for c in service):
        return None
    return service.lower()


def missing_key_text(service: str, display: Optional[str] = None, signup: Optional[str] = None) -> str:
    """The daemon's missing-key text for a valid, lower-cased ``service``."""
    if display is None:
        display, signup = BUILT_IN.get(service, (service, ""))
    fix = f"set_user_api_key {service} <your-key>"
    if signup:
        return f"No API key for {display} is available to you. Get one at {signup}, then run: {fix}"
    return f"No API key for {display} is available to you. Get a key from {display}, then run: {fix}"


def limit_text(tool_name: object, current: object, limit: object, service: object = None) -> str:
    """The daemon's daily-limit text, for any input (never raises)."""
    try:
        svc = service_name(service) if service is not None else None
        if svc is not None:
            lift = f"To lift it, set your own key with: set_user_api_key {svc} <your-key>."
        else:
            lift = "To lift it, set your own key for that service with set_user_api_key."
        return (
            f"You have used {tool_name} {current} times today on the operator's key; "
            f"the daily limit is {limit}. The limit resets at 00:00 UTC. {lift}"
        )
    except Exception:  # a parameter whose str() raises
        return (
            "You have reached today's limit on the operator's key. The limit resets at "
            "00:00 UTC. To lift it, set your own key for that service with set_user_api_key."
        )


class Messages:
    """Missing-key texts: the daemon's when learnt, else the built-in table's.

    ``ask(service)`` is called in a background thread (never the caller's) and
    returns the daemon's text or raises; a failure leaves the built-in text in use
    and is retried on a later call, no sooner than ``retry_s``.
    """

    def __init__(self, ask: Callable[[str], str], *, retry_s: float = 5.0) -> None:
        self._ask = ask
        self._retry_s = retry_s
        self._learnt: Dict[str, Tuple[str, float]] = {}  # service -> (text, when)
        self._tried: Dict[str, float] = {}
        self._queue: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self._worker: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def missing(self, service: object) -> str:
        name = service_name(service)
        if name is None:
            return GENERIC_MISSING
        now = time.monotonic()
        learnt = self._learnt.get(name)
        if learnt is None or now - learnt[1] > REFRESH_S:
            self._refresh(name, now)
        if learnt is not None:
            return learnt[0]
        return missing_key_text(name)

    def _refresh(self, name: str, now: float) -> None:
        last = self._tried.get(name)
        if last is not None and now - last < self._retry_s:
            return
        self._tried[name] = now
        self._queue.put(name)
        if self._worker is None or not self._worker.is_alive():
            with self._lock:
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(target=self._run, name="apikeyd-messages", daemon=True)
                    self._worker.start()

    def _run(self) -> None:
        while True:
            try:
                name = self._queue.get(timeout=30)
            except queue.Empty:
                return  # idle: the next call starts a new worker
            try:
                text = self._ask(name)
            except Exception:
                continue
            if isinstance(text, str) and text:
                self._learnt[name] = (text, time.monotonic())

    def learnt(self, service: str) -> Optional[str]:
        """The daemon's text for ``service`` when it has come (for tests)."""
        got = self._learnt.get(service)
        return None if got is None else got[0]

    def forget(self) -> None:
        """Drops what was learnt (after ``configure`` chose another daemon)."""
        self._learnt.clear()
        self._tried.clear()


def ask_with(make_client: Callable[[], Any]) -> Callable[[str], str]:
    """An ``ask`` for Messages: the daemon's missing_api_key_error, via a blocking client."""

    def ask(service: str) -> str:
        client = make_client()
        try:
            return str(client.missing_api_key_error(service=service)["message"])
        finally:
            client.close()

    return ask
