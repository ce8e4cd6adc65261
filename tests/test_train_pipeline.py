"""Pipeline parallelism over gloo (2 stages x 2 data-parallel ranks, ZeRO-1, on 4 ranks).

* interrupted after step 3 and resumed, a pipelined run reproduces its uninterrupted
  per-step losses exactly (fp32);
* it also follows the unpipelined run of the same seed (4 data-parallel ranks, ZeRO-1)
  step by step up to summation order: same initial weights although each stage built only
  its layers, the same samples per step, and the tied embedding's gradient summed across
  the first and last stage;
* elastic: its step-4 checkpoint resumes on 2 ranks (2 stages x 1 data-parallel, through
  the universal checkpoint): step 5 reads the same samples, with the same loss, fp32
  master weights and validation loss as on 4 ranks up to summation order; and the other
  way, a 2-rank run's step-4 checkpoint resumes on 4 ranks (2 stages x 2 data-parallel);
* validation measures the same held-out sequences with 1, 2 or 4 data-parallel replicas:
  the pipelined and the data-parallel run agree at steps 0 and 5;
* the export reads the fp32 master weights from the stages' optimizer partitions: equal to
  DeepSpeed's universal conversion of the same checkpoint, and, in a bf16 run, the masters
  whose bf16 rounding the per-layer module files hold; without optimizer files it falls
  back to those module files and warns;
* a non-finite loss is skipped by every stage alike;
* a pipelined run started from the data-parallel run's export (``checkpoint.init_from``)
  holds its weights, each stage its own layers'.

Three spawns (4 ranks run every 4-rank job, 2 ranks the shrinking resume and the 2-rank
reference, 4 ranks the growing resume), so DeepSpeed is imported once per rank and spawn;
the test compares the JSONL logs and checkpoints.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

STOP_AT = 3
RANKS = 4
ELASTIC_AT = 4  # the step of pp-ref's checkpoint that 2 ranks resume
VAL_SEQUENCES = 5  # 3 micro-batches of 2, 2 and 1: 2 replicas (one pads), 4 replicas (one only pads), 1 replica


def _raw(tmp: Path, ck: str, pipeline: bool, **over) -> dict:
    from test_train_common import run_config, small_lm

    raw = run_config(tmp, ckpt_dir=ck, **{"max_steps": 5, "parallel.global_batch_size": 8, "data.job_id": ck,
                                         "parallel.pipeline_stages": 2 if pipeline else 1,
                                         "parallel.activation_checkpointing": pipeline,
                                         "eval.every_steps": 5, "eval.val_sequences": VAL_SEQUENCES, **over})
    raw["model"] = small_lm(3)
    return raw


def _driver(tmp: Path, mode: str) -> None:
    from pretrain.config import RunConfig
    from pretrain.config_loader import build_dataclass
    from pretrain.trainer import train

    # the data-parallel run first: DeepSpeed keeps a pipeline engine's process grid in globals
    runs = [("dp-ref", False, {}, "done"), ("pp-ref", True, {}, "done"),
            ("pp-cut", True, {"faults": {"preempt_at_step": STOP_AT}}, "preempted"), ("pp-cut", True, {}, "done"),
            ("pp-nan", True, {"faults": {"nan_loss_steps": [1]}, "max_steps": 3}, "done"),
            ("pp-bf16", True, {"parallel": {"precision": "bf16"}, "max_steps": 2, "eval": {"every_steps": 0}}, "done")]
    if mode == "two":  # 2 ranks: pp-ref's step-4 checkpoint resumed, and the reference of the growth
        runs = [("pp-elastic", True, {}, "done"), ("pp-two", True, {}, "done")]
    elif mode == "grow":  # 4 ranks again: pp-two's step-4 checkpoint resumed; a run from dp-ref's export
        init = {"checkpoint": {"init_from": str(tmp / "dp-export")}, "max_steps": 1, "eval": {"every_steps": 0},
                "optim": {"lr": 1e-10, "weight_decay": 0.0, "warmup_steps": 0}}
        runs = [("pp-grow", True, {}, "done"), ("pp-init", True, init, "done")]
    for ck, pipeline, extra, expected in runs:
        raw = _raw(tmp, ck, pipeline)
        for key, value in extra.items():
            if isinstance(value, dict):
                raw.setdefault(key, {}).update(value)
            else:
                raw[key] = value
        result = train(build_dataclass(RunConfig, raw))
        assert result.status == expected, (ck, result)


def _spawn(tmp: Path, ranks: int, mode: str) -> str:
    from test_train_common import spawn_ranks

    return spawn_ranks(__file__, [str(tmp), mode], ranks, tmp / "rank_logs" / mode)


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_resume_is_exact_elastic_and_matches_data_parallel(tmp_path):
    from pretrain import checkpoint as ckpt
    from pretrain.run_log import read_metrics
    from test_train_common import losses

    out = _spawn(tmp_path, RANKS, "four")
    assert "2 pipeline stages x 2 data-parallel" in out
    shutil.copytree(ckpt.step_dir(tmp_path / "pp-ref", ELASTIC_AT), ckpt.step_dir(tmp_path / "pp-elastic", ELASTIC_AT))
    out = _spawn(tmp_path, 2, "two")
    assert "elastic resume: 4 -> 2 ranks (2 pipeline stages x 1 data-parallel)" in out
    shutil.copytree(ckpt.step_dir(tmp_path / "pp-two", ELASTIC_AT), ckpt.step_dir(tmp_path / "pp-grow", ELASTIC_AT))
    from pretrain.export import export_checkpoint, load_exported

    dp_export = export_checkpoint(tmp_path / "dp-ref", tmp_path / "dp-export")
    out = _spawn(tmp_path, RANKS, "grow")
    assert "elastic resume: 2 -> 4 ranks (2 pipeline stages x 2 data-parallel)" in out

    ref, cut = losses(tmp_path / "pp-ref"), losses(tmp_path / "pp-cut")
    assert sorted(ref) == [1, 2, 3, 4, 5] and cut == ref
    log = tmp_path / "pp-cut" / "logs" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(log, "resume")] == [STOP_AT]

    dp = {r["step"]: r for r in read_metrics(tmp_path / "dp-ref" / "logs" / "metrics.jsonl")}
    for r in read_metrics(tmp_path / "pp-ref" / "logs" / "metrics.jsonl"):
        assert r["data_fingerprint"] == dp[r["step"]]["data_fingerprint"]  # the same samples
        assert r["loss"] == pytest.approx(dp[r["step"]]["loss"], rel=1e-5), r["step"]
        assert r["grad_norm"] == pytest.approx(dp[r["step"]]["grad_norm"], rel=1e-4), r["step"]
    val = [r["loss"] for r in read_metrics(tmp_path / "pp-ref" / "logs" / "metrics.jsonl", "val")]
    val_dp = [r["loss"] for r in read_metrics(tmp_path / "dp-ref" / "logs" / "metrics.jsonl", "val")]
    assert len(val) == 2 and val == pytest.approx(val_dp, rel=1e-5)  # 2 vs 4 data-parallel replicas
    assert [r["loss"] for r in read_metrics(log, "val")] == val  # resumed: the same validation, exactly

    # the export assembles the stages' fp32 masters under LanguageModel names
    pp_model = load_exported(export_checkpoint(tmp_path / "pp-ref", tmp_path / "pp-export"))
    dp_model = load_exported(dp_export)
    dp_weights = dict(dp_model.named_parameters())
    for name, p in pp_model.named_parameters():
        torch.testing.assert_close(p, dp_weights[name], rtol=1e-4, atol=1e-5, msg=name)

    _check_elastic(tmp_path)
    _check_continues(tmp_path / "pp-grow", tmp_path / "pp-two")
    _check_init_from(tmp_path / "pp-init", dp_export)
    _check_master_export(tmp_path)

    nan_log = tmp_path / "pp-nan" / "logs" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(nan_log, "skip")] == [2]
    trained = read_metrics(nan_log)
    assert [r["step"] for r in trained] == [1, 3] and trained[0]["loss"] == ref[1]


def _check_continues(run: Path, ref: Path) -> None:
    """``run`` resumed ``ref``'s step-4 checkpoint on another number of ranks: its step 5
    reads the same samples with the same loss, validation loss and fp32 master weights."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import consolidated_state_dict
    from pretrain.run_log import read_metrics

    assert [r["step"] for r in read_metrics(run / "logs" / "metrics.jsonl", "resume")] == [ELASTIC_AT]
    got = read_metrics(run / "logs" / "metrics.jsonl")
    want = {r["step"]: r for r in read_metrics(ref / "logs" / "metrics.jsonl")}
    assert [r["step"] for r in got] == [ELASTIC_AT + 1]
    assert got[0]["data_fingerprint"] == want[ELASTIC_AT + 1]["data_fingerprint"]  # nothing repeated or skipped
    assert got[0]["loss"] == pytest.approx(want[ELASTIC_AT + 1]["loss"], rel=1e-5)
    (val,) = read_metrics(run / "logs" / "metrics.jsonl", "val")  # the same sequences on any replica count
    assert val["step"] == ELASTIC_AT + 1
    assert val["loss"] == pytest.approx(read_metrics(ref / "logs" / "metrics.jsonl", "val")[-1]["loss"], rel=1e-5)
    a, b = (consolidated_state_dict(ckpt.step_dir(r, ELASTIC_AT + 1)) for r in (run, ref))
    assert a.keys() == b.keys()
    for k in a:  # one Adam step with a wrong moment or step count would move weights by >= 1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _check_init_from(run: Path, export: Path) -> None:
    """A pipelined run started from a data-parallel run's export: each stage took its own
    layers' weights (one step at lr 1e-10 later, still the export's to 1e-8)."""
    from safetensors.torch import load_file

    from pretrain import checkpoint as ckpt
    from pretrain.export import WEIGHTS, consolidated_state_dict

    got = consolidated_state_dict(ckpt.step_dir(run, 1))
    want = load_file(str(export / WEIGHTS))
    assert want.keys() <= got.keys() and "embed.weight" in want
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")


def _check_elastic(tmp: Path) -> None:
    """pp-elastic: pp-ref's step-4 checkpoint resumed on 2 ranks, against pp-ref's step 5."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import consolidated_state_dict, model_config_from
    from pretrain.pipeline import pipeline_param_to_lm

    run = tmp / "pp-elastic"
    _check_continues(run, tmp / "pp-ref")
    # DeepSpeed's universal conversion of the step-4 checkpoint holds the same fp32 masters as the
    # export's own assembly; the tied weight came from the first stage only (declared replicated)
    step = ckpt.step_dir(run, ELASTIC_AT)
    info = torch.load(step / ckpt.DS_TAG / "mp_rank_00_model_states.pt", weights_only=False)
    patterns = info["universal_checkpoint_info"]["pipeline_replicated_parameter_patterns"]
    assert [p for p in patterns if re.match(p, "tied_modules.embed.embed.weight")] == patterns
    assert not [p for p in patterns if re.match(p, "1.mixer.q_proj.weight")]
    mcfg = model_config_from(ckpt.read_run_state(step)["model"])
    masters = consolidated_state_dict(step, mcfg)
    universal = {pipeline_param_to_lm(d.name, mcfg): torch.load(d / "fp32.pt", weights_only=False)["param"]
                 for d in (step / ckpt.UNIVERSAL / ckpt.DS_TAG / "zero").iterdir() if d.is_dir()}
    assert universal.keys() == masters.keys() and "embed.weight" in masters
    for k, t in universal.items():
        assert torch.equal(masters[k], t.view(masters[k].shape)), k


def _check_master_export(tmp: Path) -> None:
    """A bf16 pipeline run: the export holds the fp32 masters (the module files their bf16
    rounding); without optimizer files, the module weights and a warning."""
    from safetensors.torch import load_file

    from pretrain import checkpoint as ckpt
    from pretrain.export import WEIGHTS, export_checkpoint, model_config_from, pipeline_module_weights

    step = ckpt.newest_complete(tmp / "pp-bf16")
    mcfg = model_config_from(ckpt.read_run_state(step)["model"])
    module = pipeline_module_weights(step / ckpt.DS_TAG, mcfg)
    masters = load_file(export_checkpoint(step, tmp / "bf16-export") / WEIGHTS)
    assert masters.keys() == module.keys() and {t.dtype for t in module.values()} == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in masters.values())
    for k, t in module.items():
        assert torch.equal(masters[k].bfloat16(), t), k
    assert any(not torch.equal(masters[k], t.float()) for k, t in module.items())  # finer than bf16

    torn = tmp / "bf16-torn" / step.name
    shutil.copytree(step, torn)
    for f in (torn / ckpt.DS_TAG).glob("*mp_rank_01_optim_states.pt"):
        f.unlink()
    with pytest.raises(ckpt.CheckpointError, match="lacks optimizer files of stage 1"):
        export_checkpoint(torn, tmp / "torn-export")
    for f in (torn / ckpt.DS_TAG).glob("*optim_states.pt"):
        f.unlink()
    with pytest.warns(UserWarning, match="holds no optimizer state: exporting the module weights"):
        fallback = load_file(export_checkpoint(torn, tmp / "module-export") / WEIGHTS)
    for k, t in module.items():
        assert torch.equal(fallback[k], t.float()), k


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), sys.argv[2])
