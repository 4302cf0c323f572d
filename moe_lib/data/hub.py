"""The Hugging Face Hub: is it reachable, and a clear error within seconds when it is not.

Offline flags (``HF_HUB_OFFLINE`` and kin) and a short TCP probe decide; anything that needs
the Hub calls :func:`require_hub` first instead of sitting in retries.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse


OFFLINE_ALTERNATIVES = (
    "offline alternatives: corpus 'shakespeare' or 'text:<path or glob>'; tokenizer 'char', 'gpt2' or 'bpe'"
)


class HubUnavailableError(RuntimeError):
    """A corpus or tokenizer needs the Hugging Face Hub and the Hub cannot be reached."""


def _offline_flag() -> str | None:
    """The name of a Hugging Face offline variable that is switched on, if any."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return None


def _hub_address() -> tuple[str, int]:
    """Where a connection to the Hub would go first: the HTTPS proxy if one is set, else the endpoint."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            url = urlparse(os.environ[name] if "://" in os.environ[name] else f"http://{os.environ[name]}")
            return url.hostname or "", url.port or 80
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout`` seconds.

    The probe runs in a daemon thread that we stop waiting for after ``timeout``, because a
    socket timeout does not bound the DNS lookup, which can hang far longer on a dead network.
    """
    address, outcome = _hub_address(), []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(outcome and outcome[0])


def hub_problem() -> str | None:
    """Why the Hub cannot be used right now, or ``None`` when it can."""
    flag = _offline_flag()
    if flag:
        return f"{flag} is set"
    if not hub_reachable():
        host, port = _hub_address()
        return f"{host}:{port} cannot be reached (no network?)"
    return None


def hub_error(what: str, reason: str) -> HubUnavailableError:
    return HubUnavailableError(f"{what} needs the Hugging Face Hub, but {reason}. {OFFLINE_ALTERNATIVES}.")


def require_hub(what: str) -> None:
    reason = hub_problem()
    if reason:
        raise hub_error(what, reason)
