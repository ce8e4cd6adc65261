"""The GPU session scripts refuse bad input before touching a (scarce) GPU lease."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"gpu_session.sh": "GPU_SESSION_STAGES", "gpu_evals.sh": "EVALS_STAGES"}


def _run(script: str, *args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_header_from_any_directory(script, tmp_path):
    res = _run(script, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Exit status" in res.stdout and "set -u" not in res.stdout
    assert not any(line.startswith("#") for line in res.stdout.splitlines())


@pytest.mark.parametrize("script,var", SCRIPTS.items())
def test_bad_arguments_and_stages_exit_2_naming_the_fix(script, var, tmp_path):
    res = _run(script, "everything", OUT=str(tmp_path))
    assert res.returncode == 2 and var in res.stderr and "takes no arguments" in res.stderr
    res = _run(script, OUT=str(tmp_path), **{var: "env,bogus"})
    assert res.returncode == 2
    assert f"unknown stage 'bogus' in {var}; choose from: env," in res.stderr
    assert not (tmp_path / "summary.txt").exists()  # refused before any stage ran
