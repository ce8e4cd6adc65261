"""Offline mode for lm_eval's datasets when the Hugging Face Hub cannot be reached.

Compute nodes often have no network. Without ``HF_HUB_OFFLINE``, huggingface_hub then
retries every dataset request five times (about 23 s of warnings per task) before datasets
falls back to its cache, or fails. One short connection attempt to the Hub's endpoint
decides instead: unreachable, the process reads the cache only (cached datasets load at
once, others fail with ``lm_eval_adapter.hub_message``'s one line). Behind a proxy a direct
connection says nothing, so nothing is probed there.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
CHOICE_VARS = (*OFFLINE_VARS, "TRANSFORMERS_OFFLINE")  # set to anything: the user chose, no probe
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
PROBE_TIMEOUT_S = 3.0


def hub_endpoint(env: Mapping[str, str]) -> tuple[str, int]:
    """Host and port of ``HF_ENDPOINT`` (default https://huggingface.co); ValueError when its
    port is not a number."""
    url = urlsplit(env.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(env: Mapping[str, str] | None = None, timeout: float = PROBE_TIMEOUT_S,
                  connect: Callable[..., socket.socket] = socket.create_connection) -> bool | None:
    """True or False from one connection attempt (name lookup included, at most about
    ``timeout`` + 1 s); None when the user chose a mode, a proxy is set or HF_ENDPOINT is
    malformed (no probe: huggingface_hub decides as it would)."""
    env = os.environ if env is None else env
    if any(env.get(v) for v in (*CHOICE_VARS, *PROXY_VARS)):
        return None
    try:
        address = hub_endpoint(env)
    except ValueError:
        return None
    result: list[bool] = []

    def attempt() -> None:
        try:
            connect(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # in a thread: a name lookup has no timeout of its own, and a lookup that hangs is an answer too
    probe = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    probe.start()
    probe.join(timeout + 1.0)
    return bool(result and result[0])


def offline_if_hub_unreachable(log: Callable[[str], None] | None = None,
                               connect: Callable[..., socket.socket] = socket.create_connection) -> bool:
    """Switch this process to the Hugging Face cache when the Hub is unreachable; whether it did.

    Call it before datasets / huggingface_hub are imported (they read the variables then);
    where they already are, their module flags are set as well."""
    if hub_reachable(connect=connect) is not False:
        return False
    host, port = hub_endpoint(os.environ)
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    if log is None and os.environ.get("RANK", "0") != "0":
        return True  # one line per job: rank 0 says it
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"[evals] the Hugging Face Hub ({host}:{port}) is unreachable from {socket.gethostname()}: lm_eval's "
        "datasets come from the local cache only (HF_HUB_OFFLINE=1; set it yourself to skip this check)")
    return True
