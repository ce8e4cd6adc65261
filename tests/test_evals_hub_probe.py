"""evals.hub_probe: one connection attempt decides whether lm_eval's datasets come from the
Hub or from the cache only. Local sockets stand in for the Hub; no network is used."""
from __future__ import annotations

import socket
import sys
import types

import pytest

from evals import hub_probe


@pytest.fixture()
def online_env(monkeypatch):
    """No offline mode and no proxy chosen (conftest turns offline mode on for the suite)."""
    for var in (*hub_probe.CHOICE_VARS, *hub_probe.PROXY_VARS, "RANK"):
        monkeypatch.setenv(var, "")  # recorded, so that what the probe sets is undone too
        monkeypatch.delenv(var)
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_is_taken_from_hf_endpoint() -> None:
    assert hub_probe.hub_endpoint({}) == ("huggingface.co", 443)
    assert hub_probe.hub_endpoint({"HF_ENDPOINT": "http://mirror.local"}) == ("mirror.local", 80)
    assert hub_probe.hub_endpoint({"HF_ENDPOINT": "https://hf.example:8443/"}) == ("hf.example", 8443)


def test_no_probe_when_offline_mode_or_a_proxy_is_set() -> None:
    def connect(*a, **k):
        raise AssertionError("probed")

    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_DATASETS_OFFLINE": "true"}, {"HTTPS_PROXY": "http://proxy:3128"},
                {"https_proxy": "http://proxy:3128"}, {"TRANSFORMERS_OFFLINE": "1"},
                {"HF_HUB_OFFLINE": "0"},  # online chosen explicitly: not overridden
                {"HF_ENDPOINT": "https://hf.example:port"}):  # malformed: huggingface_hub's to report
        assert hub_probe.hub_reachable(env, connect=connect) is None
    assert hub_probe.hub_reachable({"HF_HUB_OFFLINE": ""}, connect=lambda *a, **k: socket.socket()) is True


def test_a_probe_that_hangs_counts_as_unreachable() -> None:
    import time

    def hang(*a, **k):
        time.sleep(5)
        return socket.socket()

    start = time.monotonic()
    assert hub_probe.hub_reachable({}, timeout=0.2, connect=hang) is False
    assert time.monotonic() - start < 3


def test_a_listening_endpoint_is_reachable_and_a_closed_one_is_not() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}
        assert hub_probe.hub_reachable(env) is True
    assert hub_probe.hub_reachable({"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}) is False


def test_an_unreachable_hub_switches_the_process_to_the_cache(online_env) -> None:
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    constants = types.SimpleNamespace(HF_HUB_OFFLINE=False)  # stand-ins for already imported modules
    config = types.SimpleNamespace(HF_HUB_OFFLINE=False, HF_DATASETS_OFFLINE=False)
    online_env.setitem(sys.modules, "huggingface_hub.constants", constants)
    online_env.setitem(sys.modules, "datasets.config", config)
    said: list[str] = []
    assert hub_probe.offline_if_hub_unreachable(log=said.append) is True
    assert [hub_probe.os.environ[v] for v in hub_probe.OFFLINE_VARS] == ["1", "1"]
    assert constants.HF_HUB_OFFLINE and config.HF_HUB_OFFLINE and config.HF_DATASETS_OFFLINE
    assert len(said) == 1 and "is unreachable" in said[0] and "HF_HUB_OFFLINE=1" in said[0]
    assert hub_probe.offline_if_hub_unreachable(log=said.append) is False  # offline now: no second probe
    assert len(said) == 1


def test_a_reachable_hub_changes_nothing(online_env) -> None:
    said: list[str] = []
    assert hub_probe.offline_if_hub_unreachable(log=said.append, connect=lambda *a, **k: socket.socket()) is False
    assert said == [] and not any(v in hub_probe.os.environ for v in hub_probe.OFFLINE_VARS)


def test_only_rank_zero_says_it(online_env, capsys) -> None:
    online_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    online_env.setenv("RANK", "1")
    assert hub_probe.offline_if_hub_unreachable() is True
    assert capsys.readouterr().err == ""
    for var in hub_probe.OFFLINE_VARS:
        online_env.delenv(var)
    online_env.setenv("RANK", "0")
    assert hub_probe.offline_if_hub_unreachable() is True
    assert "[evals] the Hugging Face Hub (127.0.0.1:" in capsys.readouterr().err
