"""``make demo`` end to end at a shorter length (24 steps, a 512-piece vocabulary): the glue
between its stages (data, interruption, resume, exact replay, export, sample, eval) is what
no other test runs. Each stage's own behaviour is tested in the other files."""
from __future__ import annotations

import json

import pytest

from pretrain.demo import main

pytestmark = pytest.mark.slow


def test_the_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["max_steps=24", "checkpoint.every_steps=8", "eval.every_steps=8", "model.vocab_size=512"], out=out)
    said = capsys.readouterr().out
    assert rc == 0, said[-3000:] + (out / "train.log").read_text()[-3000:]
    assert "will send SIGTERM after step 10" in said and "identical" in said and said.rstrip().endswith("[demo] ok")
    for stage in range(1, 8):
        assert f"[demo] {stage}/7 " in said
    heldout = json.loads((out / "eval" / "results.json").read_text())["results"]["heldout"]
    assert heldout["tokens"] > 0 and heldout["perplexity"] < 512  # better than a uniform guess
    assert (out / "export" / "export.json").is_file() and list((out / "checkpoints" / "logs" / "tensorboard").iterdir())
