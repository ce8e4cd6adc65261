"""Architecture benchmarks end to end on tiny models, and the eigenvalue-range result:
a one-layer GatedDeltaNet learns parity with eigenvalues in [-1, 1] but not in [0, 1];
and a deadline that cuts training short but still scores the run."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from evals.bench import Job, ModelSpecError, Variant, expand_variants, run_benchmark, run_jobs, run_one, summarise
from evals.report import benchmark_markdown, benchmark_plots
from evals.suites import BenchTask, customise, suite_tasks
from evals.tasks import Condition
from evals.train import StopClock, TrainConfig, lr_at


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


# A one-layer GatedDeltaNet, two 16-dim heads, no conv, no MLP: nothing but the recurrence
# can count. Checked over seeds 0-7: [-1, 1] reaches 99% validation sequence accuracy in
# 50-100 steps every time (token accuracy at 4x length 0.85-1.0); [0, 1] stays near 20%
# (token accuracy ~0.6 at length 10, ~0.53 at 40).
PARITY_MODEL = ["n_layers=1", "d_model=32", "deltaproduct.num_heads=2", "deltaproduct.head_dim=16",
                "deltaproduct.num_householder=1", "deltaproduct.use_forget_gate=false",
                "deltaproduct.conv_size=0", "deltaproduct.use_output_gate=false", "mlp_type=none"]
PARITY = BenchTask("parity_tagged", tuple(Condition(L) for L in range(2, 11)), (Condition(10), Condition(40)))
PARITY_TRAIN = TrainConfig(steps=150, batch_size=32, lr=1e-2, warmup=10, eval_every=25,
                           stop_metric="sequence", seed=0)


def test_negative_eigenvalues_learn_parity_where_positive_ones_cannot() -> None:
    neg, pos = expand_variants("gated_deltanet-tiny", PARITY_MODEL, neg_eigval=[True, False])
    assert neg.name.endswith("[-1,1]") and "deltaproduct.allow_neg_eigval=true" in neg.overrides
    r_neg = run_one(PARITY, neg, PARITY_TRAIN, eval_size=256, progress=False)
    r_pos = run_one(PARITY, pos, PARITY_TRAIN, eval_size=256, progress=False)
    (neg10, neg40), (pos10, pos40) = r_neg.eval["points"], r_pos.eval["points"]
    # [-1, 1]: almost every bit right, also at 4x the trained length.
    assert r_neg.train["converged"], r_neg.train
    assert neg10["token_acc"] > 0.95 and neg40["token_acc"] > 0.75, r_neg.eval
    assert neg10["seq_acc"] > 0.8, r_neg.eval
    # [0, 1]: no better than counting short prefixes; whole sequences fail.
    assert pos10["token_acc"] < 0.75 and pos40["token_acc"] < 0.65, r_pos.eval
    assert pos10["seq_acc"] < 0.1, r_pos.eval
    assert not r_pos.train["converged"] and r_pos.train["best_val_acc"] < 0.5, r_pos.train


def test_mqar_benchmark_runs_end_to_end_and_reports(tmp_path) -> None:
    bt = customise(suite_tasks("mqar")[0], mqar_vocab=64, mqar_train=[(32, 2), (32, 4)],
                   mqar_test=[(32, 4), (64, 8)])
    variants = expand_variants("gated_deltanet-tiny", ["n_layers=1", "d_model=32", "deltaproduct.head_dim=8"])
    cfg = TrainConfig(steps=40, batch_size=16, eval_every=20, warmup=5)
    records = run_benchmark([bt], variants, cfg, lrs=[3e-3, 1e-2], seeds=[0], eval_size=32, progress=False)
    assert len(records) == 2 and {r.lr for r in records} == {3e-3, 1e-2}
    for r in records:
        assert r.train["steps"] == 40 and len(r.train["history"]) == 2
        assert [(p["length"], p["pairs"]) for p in r.eval["points"]] == [(32, 4), (64, 8)]
        assert all(0.0 <= p["token_acc"] <= 1.0 for p in r.eval["points"])
    rows = summarise(records)
    assert len(rows) == 1 and rows[0]["lr"] in (3e-3, 1e-2)
    md = benchmark_markdown(rows, {"model": "tiny"})
    assert "## mqar" in md and "32/4" in md and "64/8" in md
    paths = benchmark_plots(rows, tmp_path)
    assert paths[0].name == "mqar.png" and paths[0].stat().st_size > 1000
    json.dumps([r.__dict__ for r in records])  # records are JSON-ready


def test_variants_expand_to_the_right_keys_and_reject_what_does_not_apply() -> None:
    vs = expand_variants("gated_deltaproduct-tiny", [], neg_eigval=[True, False], n_h=[1, 2])
    assert len(vs) == 4 and len({v.name for v in vs}) == 4
    assert "deltaproduct.num_householder=2" in vs[1].overrides
    m = expand_variants("mamba2-tiny", [], neg_eigval=[True])
    assert m[0].overrides == ["mamba2.allow_neg_eigval=true"]
    with pytest.raises(ModelSpecError, match="eigenvalue"):
        expand_variants("hawk-tiny", [], neg_eigval=[True])
    with pytest.raises(ModelSpecError, match="n_h"):
        expand_variants("mamba2-tiny", [], n_h=[2])
    with pytest.raises(ModelSpecError, match="did you mean"):
        expand_variants("mamba2-tinny", [])
    with pytest.raises(ModelSpecError, match="does not exist"):
        expand_variants("/no/such/checkpoint", [])


def test_suites_follow_the_literature_and_lr_schedule_warms_up() -> None:
    mqar = suite_tasks("mqar")[0]
    assert mqar.task_kwargs["vocab_size"] == 8192 and (Condition(512, 64) in mqar.train)
    assert max(c.length for c in mqar.test) > max(c.length for c in mqar.train)
    st = {bt.task: bt for bt in suite_tasks("state_tracking")}
    assert set(st) == {"parity", "modular_arithmetic", "modular_arithmetic_brackets", "s3", "s4", "a5", "s5", "z60"}
    assert (st["parity"].train_max, max(c.length for c in st["parity"].test)) == (40, 256)
    assert (st["a5"].train_max, max(c.length for c in st["a5"].test)) == (128, 512)
    with pytest.raises(ValueError, match="did you mean 'mqar'"):
        suite_tasks("mqr")
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=0.01)


def test_training_stops_at_target_accuracy() -> None:
    """A task the model can solve at once (Z2 on one token) stops at the first validation."""
    bt = BenchTask("parity", (Condition(1),), (Condition(1),))
    v = Variant("tiny", "gated_deltanet-tiny", ["n_layers=1", "d_model=16", "deltaproduct.head_dim=8"])
    r = run_one(bt, v, TrainConfig(steps=400, batch_size=32, lr=1e-2, eval_every=20, warmup=5), 64, progress=False)
    assert r.train["converged"] and r.train["steps"] < 400
    assert r.train["best_val_acc"] >= 0.99 and r.longest_solved == 1


@pytest.mark.gpu
def test_parity_benchmark_trains_on_cuda() -> None:
    """The same run on the GPU path (Triton kernels): [-1, 1] still learns parity."""
    (neg,) = expand_variants("gated_deltanet-tiny", PARITY_MODEL, neg_eigval=[True])
    r = run_one(PARITY, neg, replace(PARITY_TRAIN, device="cuda"), eval_size=256, progress=False)
    assert r.train["converged"] and r.eval["points"][0]["token_acc"] > 0.95, (r.train, r.eval)


TINY_VARIANT = Variant("tiny", "gated_deltanet-tiny", ["n_layers=1", "d_model=16", "deltaproduct.head_dim=8"])
SHORT_PARITY = BenchTask("parity", (Condition(2), Condition(4)), (Condition(4), Condition(8)))


def test_deadline_stops_training_after_one_step_and_the_run_is_still_scored() -> None:
    """A deadline already past: one step, a last validation, the test evaluation, the flag."""
    cfg = TrainConfig(steps=1000, batch_size=8, eval_every=50, val_size=16)
    r = run_one(SHORT_PARITY, TINY_VARIANT, cfg, eval_size=16, progress=False, deadline=time.monotonic())
    assert r.train["stopped_by_time_limit"] and r.train["steps"] == 1
    assert [h["step"] for h in r.train["history"]] == [1]  # the weights it stopped with were validated
    assert [p["length"] for p in r.eval["points"]] == [4, 8]
    (row,) = summarise([r])
    assert row["stopped_by_time_limit"] == 1
    assert "| 0/1 (1 stopped by time limit) | 1 |" in benchmark_markdown([row], {})
    free = run_one(SHORT_PARITY, TINY_VARIANT, replace(cfg, steps=3), eval_size=16, progress=False)
    assert not free.train["stopped_by_time_limit"] and free.train["steps"] == 3


def test_run_jobs_reports_each_record_and_starts_nothing_past_the_deadline() -> None:
    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, val_size=8)
    jobs = [Job(SHORT_PARITY, TINY_VARIANT, 1e-3, seed) for seed in (0, 1)]
    seen = []
    records, skipped = run_jobs(jobs, cfg, eval_size=8, progress=False, on_record=seen.append)
    assert seen == records and [r.seed for r in records] == [0, 1] and skipped == []
    records, skipped = run_jobs(jobs, cfg, eval_size=8, progress=False, deadline=time.monotonic() - 1)
    assert records == [] and skipped == jobs
    assert skipped[1].describe() == {"task": "parity", "variant": "tiny", "lr": 1e-3, "seed": 1}


def test_stop_clock_prices_the_next_step_and_the_evaluation_that_must_follow() -> None:
    clock = StopClock(time.monotonic() + 200.0, val_tokens=100, eval_tokens=10_000)
    assert not clock.out_of_time(validates=True)
    clock.step_done(900.0)  # a first step that compiled kernels ...
    clock.step_done(0.01)
    clock.step_done(0.01)  # ... is outvoted by the median of the steps since
    clock.validation_done(1.0)  # 0.01 s per token: the evaluation fits (~150 s with the margin)
    assert not clock.out_of_time(validates=True)
    clock.validation_done(10.0)  # 0.1 s per token: ~1000 s of evaluation does not fit
    assert clock.out_of_time(validates=False)
    assert StopClock(time.monotonic() - 1.0, 1, 1).out_of_time(validates=False)


def test_a_diverging_learning_rate_ends_its_run_not_the_sweep() -> None:
    """lr 1e4 blows up (non-finite loss): that run stops and says so, the other learning rate
    still runs, and the sweep picks it."""
    (variant,) = expand_variants("gated_deltanet-tiny", PARITY_MODEL)
    cfg = replace(PARITY_TRAIN, steps=20, eval_every=10)
    records = run_benchmark([PARITY], [variant], cfg, lrs=[1e4, 1e-2], seeds=[0], eval_size=32, progress=False)
    bad, good = records
    assert "non-finite loss" in bad.train["diverged"] and not bad.train["converged"]
    assert good.train["diverged"] is None and good.train["steps"] == 20
    (row,) = summarise(records)
    assert row["lr"] == 1e-2 and row["diverged"] == 0


@pytest.mark.parametrize("scores, kept", [((0.9, 0.5), 0), ((0.0, 0.0), 0), ((0.0, 0.5), 1)])
def test_the_test_scores_the_weights_of_the_best_validation(monkeypatch, scores, kept) -> None:
    """The sweep ranks runs by their best validation accuracy, so a run whose accuracy later
    fell is tested with the weights that scored its best, not its last ones; a run that never
    scored above 0 keeps trained weights (its first validation's), not the initial ones."""
    import evals.train as train_mod
    from evals.suites import BenchTask as BT
    from evals.tasks import make_task
    from pretrain.models import build_model
    from evals.bench import model_config

    accuracies = iter(scores)
    monkeypatch.setattr(train_mod, "_timed_validation", lambda *a, **k: next(accuracies))
    after: list[dict] = []
    real_step = train_mod._train_step

    def step_and_keep(model, *args):
        loss = real_step(model, *args)
        after.append({k: v.clone() for k, v in model.state_dict().items()})
        return loss

    monkeypatch.setattr(train_mod, "_train_step", step_and_keep)
    task = make_task("parity")
    model = build_model(model_config("gated_deltanet-tiny", [*PARITY_MODEL, f"vocab_size={task.vocab_size}"]))
    bt = BT("parity", (Condition(4),), (Condition(4),))
    result = train_mod.train_on_task(model, task, list(bt.train), replace(PARITY_TRAIN, steps=2, eval_every=1),
                                     progress=False)
    assert result.best_val_acc == max(scores) and result.steps == 2
    final = model.state_dict()
    assert all(torch.equal(final[k], after[kept][k]) for k in final)  # that step's weights, not the other's
    assert any(not torch.equal(after[0][k], after[1][k]) for k in final)


def test_an_impossible_condition_stops_before_any_training(monkeypatch) -> None:
    import evals.bench as bench

    monkeypatch.setattr(bench, "run_one", lambda *a, **k: pytest.fail("trained before checking the conditions"))
    bt = customise(suite_tasks("mqar")[0], mqar_vocab=64, mqar_train=[(32, 2)], mqar_test=[(16, 2), (32, 16)])
    (variant,) = expand_variants("gated_deltanet-tiny", PARITY_MODEL)
    with pytest.raises(ValueError, match="4\\*pairs <= seq_len"):
        run_jobs([Job(bt, variant, 1e-3, 0)], PARITY_TRAIN)


def test_a_task_named_twice_in_a_suite_runs_once() -> None:
    names = [bt.task for bt in suite_tasks("state_tracking,parity")]
    assert names.count("parity") == 1 and len(names) == len(set(names))
