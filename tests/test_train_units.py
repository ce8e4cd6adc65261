"""Pure pieces of the trainer: schedules, weight-decay groups, FLOP counts, validation, the
DeepSpeed config, stop flags, spikes, the watchdog. No process group, no DeepSpeed engine.
(The checkpoint directory's rules: test_train_checkpoint_files.py; what a resume may change:
test_train_resume_rules.py; the run log: test_train_run_log.py.)"""
from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pretrain import checkpoint as ckpt
from pretrain.config import OptimizerConfig, RunConfig
from pretrain.config_loader import CONFIGS_DIR, ConfigError, load_config, load_model_config
from pretrain.ds_config import deepspeed_config, grad_accum_steps
from pretrain.flops import flops_per_token, mean_window, mixer_flops
from pretrain.models import build_model
from pretrain.models.layers import ShortConvolution
from pretrain.optim import param_groups
from pretrain.schedule import lr_at


def test_schedules():
    cos = OptimizerConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cos, 100) == pytest.approx(0.1)
    assert lr_at(9, cos, 100) == pytest.approx(1.0)
    assert lr_at(55, cos, 100) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(100, cos, 100) == pytest.approx(0.1)
    wsd = OptimizerConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, wsd, 100) for s in (10, 79)] == [1.0, 1.0]
    assert lr_at(89, wsd, 100) == pytest.approx(0.5)
    assert lr_at(99, wsd, 100) == pytest.approx(0.0)
    const = OptimizerConfig(lr=2.0, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const, 50) for s in range(50)} == {2.0}


def test_no_weight_decay_on_norms_biases_and_marked_gates():
    cfg = load_model_config("griffin-tiny", ["vocab_size=64"])
    model = build_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert any(n.endswith("a_param") for n in no_decay)  # marked _no_weight_decay
    assert any(n.endswith(".bias") for n in no_decay)
    assert "norm.weight" in no_decay and any("mixer_norm" in n for n in no_decay)
    assert "embed.weight" in decay and any(n.endswith("out_proj.weight") for n in decay)
    assert len(decay) + len(no_decay) == len({id(p) for p in model.parameters()})  # tied weight once


@pytest.mark.parametrize("preset", ["gated_deltaproduct-tiny", "mamba2-tiny", "griffin-tiny"])
def test_the_training_builds_keep_the_gates_out_of_weight_decay(preset):
    """Training builds on the meta device and moves part by part (``build_model_on``, the
    pipeline layers): new Parameter objects, which must keep the models' no-decay marks."""
    from pretrain.models.materialize import HOST, Placement, build_model_on
    from pretrain.models.pipeline import build_pipeline_layers
    from pretrain.optim import no_decay_names

    cfg = load_model_config(preset, ["vocab_size=64"])
    marked = no_decay_names(build_model(cfg, init_seed=0))
    gates = {n for n in marked if n.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D", "a_param")}
    assert gates
    for place in (HOST, Placement(torch.device("cpu"), torch.float32, initialise=False)):
        assert no_decay_names(build_model_on(cfg, place, init_seed=0)) == marked
    layers = build_pipeline_layers(cfg, 0)
    in_layers = [f"{i}.{n}" for i, layer in enumerate(layers) for n in no_decay_names(layer)
                 if n.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D", "a_param")]
    assert len(in_layers) == len(gates)


def _sequence_mixing(name: str, cfg, seq: int) -> int:
    """Per token, what a mixer does besides its weights (MFU's honest count, derived here
    from each recurrence's form, independently of pretrain/flops.py)."""
    if name == "gated_deltaproduct":
        c = cfg.deltaproduct
        K = c.head_dim
        V = int(K * c.expand_v)
        decay = K * V if c.use_forget_gate else 0  # S *= a
        steps = c.num_householder * 5 * K * V  # S^T k (2KV), rank-1 update (2KV), difference and scale (KV)
        return c.num_heads * (decay + steps + 2 * K * V)  # readout S^T q
    if name == "mamba2":
        c = cfg.mamba2
        H = c.expand * cfg.d_model // c.head_dim
        return H * (5 * c.head_dim * c.d_state + c.head_dim)  # h = a h + dt x B^T, y = h C, + D x
    if name == "rglru":
        return 6 * (cfg.rglru.lru_width or cfg.d_model)  # gated diagonal recurrence per channel
    if name == "local_attention":
        c = cfg.attention
        hd = c.head_dim or cfg.d_model // c.num_heads
        return int(4 * c.num_heads * hd * mean_window(seq, c.window))  # QK^T and AV over the span
    raise AssertionError(name)


@pytest.mark.parametrize("preset", ["gated_deltaproduct-tiny", "mamba2-tiny", "hawk-tiny", "griffin-tiny"])
def test_mixer_flops_cover_every_weight_of_the_mixer(preset):
    """Each family's count is 2 x (its weights) per token plus its recurrence's own work,
    exactly."""
    cfg = load_model_config(preset)
    model = build_model(cfg, device="meta")
    seq = 512
    for block in model.blocks:
        weights = sum(m.weight.numel() for m in block.mixer.modules()
                      if isinstance(m, (nn.Linear, ShortConvolution)))
        weights += sum(m.weight.numel() for m in block.mixer.modules() if type(m).__name__ == "BlockDiagLinear")
        flops = mixer_flops(block.mixer_name, cfg, seq)
        sequence_mixing = flops - 2 * weights
        assert sequence_mixing == _sequence_mixing(block.mixer_name, cfg, seq), block.mixer_name
    total = flops_per_token(cfg, seq)
    assert total.head == 2 * cfg.d_model * cfg.vocab_size
    assert total.train == 3 * total.forward


def test_attention_span_and_recurrence_scaling():
    assert mean_window(4, 8) == pytest.approx(2.5)
    assert mean_window(1000, 10) == pytest.approx((55 + 990 * 10) / 1000)
    cfg = load_model_config("gated_deltaproduct-tiny")
    a = mixer_flops("gated_deltaproduct", cfg, 128)
    cfg.deltaproduct.num_householder += 1
    assert mixer_flops("gated_deltaproduct", cfg, 128) > a  # each Householder step costs
    assert mixer_flops("gated_deltaproduct", cfg, 128) == mixer_flops("gated_deltaproduct", cfg, 8192)


def test_grad_accumulation_keeps_the_global_batch():
    cfg = load_config(None, ["parallel.micro_batch_size=2", "parallel.global_batch_size=8"])
    assert grad_accum_steps(cfg, 1) == 4 and grad_accum_steps(cfg, 2) == 2 and grad_accum_steps(cfg, 4) == 1
    with pytest.raises(ConfigError, match="global_batch_size=8"):
        grad_accum_steps(cfg, 3)
    ds = deepspeed_config(cfg, 2)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert "bf16" in ds and ds["zero_optimization"]["stage"] == 1


def test_validation_set_is_fixed_and_shared_out_by_micro_batch():
    from pretrain.validation import replica_share, val_indices

    assert val_indices(10, 4) == [0, 2, 5, 7]  # spread over the split, not its first sequences
    assert val_indices(3, 8) == [0, 1, 2] and val_indices(0, 5) == []
    indices = val_indices(17, 7)
    for micro in (1, 2, 3):
        batches = [indices[i:i + micro] for i in range(0, len(indices), micro)]
        for dp in (1, 2, 3, 4, 9):
            shares = [replica_share(indices, micro, dp, r) for r in range(dp)]
            assert len({len(s.batches) for s in shares}) == 1  # the same number of forward passes
            for r, s in enumerate(shares):
                assert s.batches[:s.real] == batches[r::dp]  # micro-batch b on replica b % dp
                assert all(b == batches[0] for b in s.batches[s.real:])  # padding repeats batch 0
            assert sorted(i for s in shares for b in s.batches[:s.real] for i in b) == indices
    with pytest.raises(ValueError, match="replica 2 is outside 2"):
        replica_share(indices, 2, 2, 2)


def test_validation_sums_losses_over_label_tokens():
    import torch

    from pretrain.validation import token_sums

    def batch(labels: list[int]) -> dict:
        return {"labels": torch.tensor([labels])}

    batches = [batch([5, 6, 7, -100]), batch([-100, 9, -100, -100]), batch([1, 2, 3, 4])]
    # token-weighted: (1*3 + 4*1) / 4 tokens, not the mean of batch means (2.5); the padding batch is left out
    assert token_sums([torch.tensor(1.0), torch.tensor(4.0), torch.tensor(9.0)], batches, real=2) == (7.0, 4.0)
    assert token_sums([], batches, real=2) == (0.0, 0.0)  # a pipeline stage other than the last


def test_validation_size_key_and_its_deprecated_alias():
    from pretrain.config import DEFAULT_VAL_SEQUENCES

    assert load_config(None, []).eval.num_sequences(8) == DEFAULT_VAL_SEQUENCES
    assert load_config(None, ["eval.val_sequences=40"]).eval.num_sequences(8) == 40
    assert load_config(None, ["eval.val_batches=5"]).eval.num_sequences(8) == 40  # micro-batches in all
    with pytest.raises(ConfigError, match="eval.val_batches.*deprecated form of eval.val_sequences"):
        load_config(None, ["eval.val_batches=5", "eval.val_sequences=40"])
    for path in sorted((CONFIGS_DIR / "runs").glob("*.yaml")):
        assert load_config(path).eval.val_batches is None, path  # the recipes use the new key


def test_validation_loss_is_token_weighted_whatever_the_split(tmp_path):
    """Every (replica count, micro-batch size) gives the loss of the whole set in one batch,
    read by global index whatever the loader's rank partition."""
    import torch
    from test_data_common import data_config, prepared

    from data import DataError
    from data.loader import TokenLoader
    from pretrain.engine import LossModule
    from pretrain.validation import forward_losses, replica_share, token_sums, val_indices

    cfg = data_config(tmp_path, prepared())
    with TokenLoader(cfg, 1, split="val", shuffle=False) as whole, \
            TokenLoader(cfg, 1, split="val", rank=1, world_size=2) as rank1:
        canonical = [b["input_ids"][0] for b in whole]
        assert whole.num_samples == rank1.num_samples == len(canonical) >= 5
        indices = val_indices(whole.num_samples, 5)
        got = rank1.batch_at(indices)
        assert torch.equal(got["input_ids"], torch.stack([canonical[i] for i in indices]))
        with pytest.raises(DataError, match=f"sample index {whole.num_samples} is outside split 'val'"):
            whole.batch_at([0, whole.num_samples])

        torch.manual_seed(0)
        model = LossModule(build_model(load_model_config(
            "gated_deltaproduct-tiny", ["vocab_size=512", "d_model=32", "n_layers=1"])))
        every = whole.batch_at(indices)
        want = float(forward_losses(model, [every], torch.device("cpu"))[0])
        for micro, dp in ((2, 1), (1, 3), (2, 2), (4, 3)):  # padded shares and a short last batch too
            total = [0.0, 0.0]
            for r in range(dp):
                share = replica_share(indices, micro, dp, r)
                batches = [whole.batch_at(ix) for ix in share.batches]
                sums = token_sums(forward_losses(model, batches, torch.device("cpu")), batches, share.real)
                total = [a + b for a, b in zip(total, sums)]
            assert total[1] == float((every["labels"] != -100).sum())
            assert total[0] / total[1] == pytest.approx(want, rel=1e-5), (micro, dp)
        assert model.training  # forward_losses puts the module back into training mode


def test_pipeline_layouts_are_checked_before_anything_starts(capsys):
    from pretrain.cli import main
    from pretrain.pipeline import check_pipeline

    with pytest.raises(ConfigError, match="zero_stage=1"):
        load_config(None, ["parallel.pipeline_stages=2", "parallel.zero_stage=2"])
    over = ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.micro_batch_size=2",
            "parallel.global_batch_size=8", "model.preset=gated_deltaproduct-tiny"]
    cfg = load_config(None, over)
    assert check_pipeline(cfg, 2) == 1 and check_pipeline(cfg, 4) == 2  # data-parallel ranks
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        check_pipeline(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch_size x ranks = 2 x 8"):
        check_pipeline(cfg, 8)  # 8 ranks load 2 sequences each: 16 > 8
    with pytest.raises(ConfigError, match="exceeds the"):
        check_pipeline(load_config(None, over[1:] + ["parallel.pipeline_stages=8", "model.n_layers=2",
                                                    "parallel.global_batch_size=16"]), 8)
    assert main(["--dry-run", "configs/runs/demo.yaml", *over, "parallel.plan_world_size=3"]) == 2
    assert "does not divide the 3 ranks" in capsys.readouterr().err


def test_pipeline_parameter_names_map_to_the_language_model():
    from pretrain.pipeline import pipeline_param_to_lm

    cfg = load_model_config("gated_deltaproduct-tiny")  # layers: embedding, blocks 1..n, norm n+1, head n+2
    n = cfg.n_layers
    assert pipeline_param_to_lm("tied_modules.embed.embed.weight", cfg) == "embed.weight"
    assert pipeline_param_to_lm("0.embed.weight", cfg) == "embed.weight"
    assert pipeline_param_to_lm("1.mixer.q_proj.weight", cfg) == "blocks.0.mixer.q_proj.weight"
    assert pipeline_param_to_lm(f"{n}.mlp_norm.weight", cfg) == f"blocks.{n - 1}.mlp_norm.weight"
    assert pipeline_param_to_lm(f"{n + 1}.norm.weight", cfg) == "norm.weight"
    assert pipeline_param_to_lm(f"{n + 2}.lm_head.weight", cfg) == "lm_head.weight"
    lm_names = set(dict(build_model(cfg, device="meta").named_parameters()))
    assert {"embed.weight", "norm.weight", f"blocks.{n - 1}.mlp_norm.weight"} <= lm_names
    with pytest.raises(ValueError, match="not a pipeline layer parameter name"):
        pipeline_param_to_lm("embed.weight", cfg)


def test_universal_load_repair_matches_param_groups_by_name(tmp_path):
    """DeepSpeed copies the saved groups' hyperparameters (from a pipeline's first stage) by
    position; each group must end with those of its own name, or keep its own."""
    from types import SimpleNamespace

    import torch

    zero = tmp_path / ckpt.DS_TAG / "zero"
    zero.mkdir(parents=True)
    decay, no_decay = {"name": "decay", "weight_decay": 0.1, "eps": 1e-8}, {"name": "no_decay", "weight_decay": 0.0,
                                                                          "eps": 1e-8}

    def optimizer(*groups):
        opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))], **g} for g in groups], lr=1.0)
        return SimpleNamespace(param_groups=opt.param_groups, optimizer=opt)

    def save(*saved):
        torch.save({"param_groups": [{**g, "params": [i]} for i, g in enumerate(saved)]}, zero / "optimizer_state.pt")

    def repair(saved, groups, after_load):
        save(*saved)
        opt = optimizer(*groups)
        own = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        for group, hyper in zip(opt.param_groups, after_load):  # what DeepSpeed's loader left
            group.update(hyper)
        ckpt._repair_universal_load(opt, tmp_path, own)
        return [(g["name"], g["weight_decay"]) for g in opt.param_groups]

    # a stage of norms only: DeepSpeed gave its one group the first stage's decay hyperparameters
    assert repair([decay, no_decay], [no_decay], [decay]) == [("no_decay", 0.0)]
    assert repair([decay, no_decay], [decay, no_decay], [decay, decay]) == [("decay", 0.1), ("no_decay", 0.0)]
    assert repair([decay], [{**no_decay, "weight_decay": 0.0}], [decay]) == [("no_decay", 0.0)]  # keeps its own
    with pytest.raises(ckpt.CheckpointError, match="has 1 optimizer param groups, this optimizer .* 2"):
        repair([decay], [decay, no_decay], [decay, no_decay])  # DeepSpeed loaded only the first group

    save(decay, no_decay)
    opt = optimizer(decay, no_decay)  # ZeRO-3 gives all groups one step tensor: AdamW would add to it twice
    step = torch.tensor(4.0)
    for p in (g["params"][0] for g in opt.param_groups):
        opt.optimizer.state[p]["step"] = step
    ckpt._repair_universal_load(opt, tmp_path, [decay, no_decay])
    steps = [s["step"] for s in opt.optimizer.state.values()]
    assert steps[0] is not steps[1] and all(s.item() == 4.0 for s in steps)


def test_progress_durations_read_at_a_glance():
    from pretrain.trainer import _duration

    assert [_duration(x) for x in (0.4, 12, 250, 7500, 3 * 86400 + 4 * 3600 + 59)] == [
        "0s", "12s", "4m10s", "2h05m", "3d04h"]


def test_run_config_defaults_are_consistent():
    cfg = RunConfig()
    assert cfg.max_nonfinite_steps >= 1 and cfg.faults.nan_loss_steps == []
    assert not math.isnan(cfg.optim.lr)


def test_stop_flag_signals_and_wall_clock_budget():
    import os
    import signal

    from pretrain.preemption import StopFlag

    with StopFlag() as stop:
        assert stop.agree(1.0, 1.0) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only records it
        assert stop.agree(1.0, 1.0) == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    with StopFlag(wall_clock_budget_s=100.0, started_at=time.monotonic()) as stop:
        assert stop.agree(seconds_per_step=10.0, seconds_per_save=5.0) is None
        stop.start -= 85.0  # 85 s gone: one more step + save (16.5 s with margin) would overrun
        assert stop.agree(seconds_per_step=10.0, seconds_per_save=5.0) == "wall-clock budget"
    # by default the budget counts from the process's start (imports and start-up included)
    from pretrain.preemption import process_started_at
    ps = subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5); from pretrain.preemption import "
                         "process_started_at as s; print(time.monotonic() - s())"],
                        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    assert 1.4 < float(ps.stdout) < 30.0
    assert abs(StopFlag().start - process_started_at()) < 0.05 and process_started_at() < time.monotonic()


def test_signal_during_start_up_is_kept_for_the_first_stop_flag():
    import os
    import signal

    from pretrain.preemption import StopFlag, install_early_handlers

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        install_early_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not fatal
        with StopFlag() as stop:
            assert stop.requested == "SIGUSR1"
            assert stop.agree(1.0, 1.0) == "SIGUSR1"
        with StopFlag() as stop:  # consumed once
            assert stop.agree(1.0, 1.0) is None
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_checkpoints_from_the_old_checkpointing_wrapper_still_load():
    """Before 2026-11-29 activation checkpointing wrapped each block, so its parameters were
    saved as ``lm.blocks.N.block.*``; such a checkpoint loads into today's names."""
    import torch

    from pretrain.engine import LossModule, apply_activation_checkpointing

    module = LossModule(build_model(load_model_config("gated_deltaproduct-tiny")))
    apply_activation_checkpointing(module.lm)
    old = {k.replace("lm.blocks.0.", "lm.blocks.0.block."): v.detach() + 1 for k, v in module.state_dict().items()}
    assert any(".block." in k for k in old)
    module.load_state_dict(old, strict=True)
    new = module.state_dict()
    assert all(torch.equal(new[k.replace("lm.blocks.0.block.", "lm.blocks.0.")], v) for k, v in old.items())


def test_loss_spikes_are_reported_and_a_lasting_one_names_the_checkpoint_to_rewind_to(tmp_path):
    import random

    from pretrain.spikes import MIN_HISTORY, PATIENCE, SpikeWatch, spike_message

    gen = random.Random(0)
    watch = SpikeWatch(6.0)
    assert watch.observe(1, 50.0) is None  # too early to judge
    watch = SpikeWatch(6.0)
    losses = [3.0 + 5.0 * math.exp(-s / 300) + gen.gauss(0, 0.02) for s in range(1, 3001)]
    assert all(watch.observe(s, x) is None for s, x in enumerate(losses, 1))  # a noisy falling loss
    level = losses[-1]
    spike = watch.observe(3001, level + 0.5)
    assert spike is not None and not spike.sustained and spike.since == 3001 and spike.sigmas > 6
    assert watch.observe(3002, level) is None and watch.observe(3003, float("nan")) is None
    found = [watch.observe(s, level + 0.5) for s in range(3004, 3004 + PATIENCE)]
    assert all(found) and [f.sustained for f in found] == [False] * (PATIENCE - 1) + [True]
    assert found[-1].since == 3004
    assert all(watch.observe(s, level + 0.5) is None for s in range(4000, 4000 + MIN_HISTORY + 5))  # the new level
    # 3003's weights gave the loss of step 3004: not a checkpoint before the spike
    for step, complete in ((2000, True), (3000, True), (3003, True), (3004, False)):
        ckpt.step_dir(tmp_path, step).mkdir()
        if complete:
            (ckpt.step_dir(tmp_path, step) / ckpt.MARKER).write_text("ok")
    assert spike_message(spike, tmp_path).startswith(
        f"loss spike at step 3001: {level + 0.5:.4f}, {spike.sigmas:.1f} standard deviations above the mean ")
    assert spike_message(found[-1], tmp_path) == (
        f"the loss has stayed high for {PATIENCE} steps since step 3004: if it does not come back, stop the job and "
        "run `linrnn-train <the run's arguments> --rewind-to 3000 --skip-steps 4` (back to the newest checkpoint "
        "before the spike, past the data that led to it; see --rewind-to), then submit the job again")
    off = SpikeWatch(0.0)
    assert all(off.observe(s, x) is None for s, x in enumerate(losses + [100.0], 1))


def test_fp16_loss_scale_overflows_are_not_counted_as_non_finite_steps():
    from pretrain.trainer import skip_kind

    assert skip_kind(False, 2.5, "fp16") is None
    assert skip_kind(True, 2.5, "fp16") == "overflow"  # DeepSpeed lowers the scale: routine
    assert skip_kind(True, float("nan"), "fp16") == "non_finite"
    assert skip_kind(True, 2.5, "bf16") == "non_finite"  # a non-finite gradient (check_grad_overflow)
    assert skip_kind(True, float("inf"), "fp32") == "non_finite"


def test_fp16_at_the_loss_scale_floor_stops_as_a_diverging_run():
    """Overflows do not count as non-finite steps, so a diverging fp16 run ends at DeepSpeed's
    loss-scale floor, which raises a bare Exception: it becomes the trainer's error with the fix."""
    from pretrain.trainer import TrainError, fp16_floor_is_divergence

    with pytest.raises(TrainError, match=r"step 12: fp16 gradients overflow even at DeepSpeed's minimum loss "
                       r"scale: the run diverges.*parallel.precision=bf16"):
        with fp16_floor_is_divergence(12):  # DeepSpeed's own message (runtime/fp16/loss_scaler.py)
            raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")
    with pytest.raises(ValueError, match="something else"):
        with fp16_floor_is_divergence(12):
            raise ValueError("something else")


def test_the_watchdog_ends_a_rank_only_when_its_beats_stop() -> None:
    """Beats keep it quiet, and a pause stops the watch; without a beat for hang_timeout_s it
    says what the rank was doing and exits with HANG_EXIT_CODE; none (timeout None) watches
    nothing."""
    from pretrain.watchdog import HANG_EXIT_CODE, Watchdog

    said, codes = [], []
    with Watchdog(0.4, rank=3, log=said.append, exit=codes.append, poll_s=0.02) as dog:
        with dog.paused("waiting for the run lock"):  # a wait with its own limit: not watched
            time.sleep(0.8)
        for i in range(10):  # 1 s of steady progress
            dog.beat(f"running step {i + 1}")
            time.sleep(0.1)
        assert codes == []
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.02)
    assert codes == [HANG_EXIT_CODE]
    assert re.match(r"\[watchdog\] rank 3: no progress for \d+ s \(hang_timeout_s=0\.4\) while running step 10\.",
                    said[0])
    with Watchdog(None, rank=0, exit=codes.append) as idle:
        idle.beat("step 1")
    assert idle._thread is None and codes == [HANG_EXIT_CODE]


def test_the_progress_line_s_throughput_mfu_and_eta():
    """tokens/s over the window's steps (global batch x seq_len each), MFU against every
    rank's peak, and the ETA of the steps left at the window's pace."""
    from types import SimpleNamespace

    from pretrain.trainer import Trainer

    said = []
    t = Trainer.__new__(Trainer)  # only what report_progress reads
    t.cfg = load_config(None, ["parallel.global_batch_size=4", "parallel.micro_batch_size=2", "max_steps=10"])
    t.tokens_per_step, t.step, t.peak, t.dev = 4 * 128, 4, 1e12, torch.device("cpu")
    t.flops = SimpleNamespace(train=3e6)
    t.env = SimpleNamespace(world_size=2)
    t.pace = SimpleNamespace(enabled=False)
    t.log = SimpleNamespace(print=said.append)
    got = t.report_progress({"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5}, steps=2, elapsed=1.0)
    assert got["tokens_per_s"] == 2 * 4 * 128  # 1024 tokens/s
    assert got["mfu"] == pytest.approx(1024 * 3e6 / (2 * 1e12))
    assert got["eta_s"] == 3.0  # 6 steps left at 0.5 s each
    assert len(said) == 1 and re.fullmatch(
        r"\[train\] step 4/10: loss 2\.5000, lr 1\.00e-03, grad norm 0\.500, 1,024 tok/s, MFU 0\.2%, "
        r"peak mem [\d.]+ GB, ETA 3s", said[0]), said


def test_the_demo_interrupts_between_checkpoints_and_refuses_overrides_that_leave_no_room(tmp_path, capsys):
    from pretrain.config_loader import load_config
    from pretrain.demo import DEMO_CONFIG, interrupt_step, main

    assert interrupt_step(load_config(DEMO_CONFIG, [])) == 35  # checkpoints every 15 of 60 steps: after 30
    assert interrupt_step(load_config(DEMO_CONFIG, ["max_steps=24", "checkpoint.every_steps=8"])) == 10
    assert interrupt_step(load_config(DEMO_CONFIG, ["max_steps=400", "checkpoint.every_steps=100"])) == 233
    for over, says in ((["eval.every_steps=0"], "needs periodic checkpoints and validation"),
                       (["checkpoint.every_steps=0"], "needs periodic checkpoints and validation"),
                       (["max_steps=20"], "needs max_steps >= 22, not 20: raise max_steps")):
        with pytest.raises(ValueError, match=says):
            interrupt_step(load_config(DEMO_CONFIG, over))
    assert main(["max_steps=20"], out=tmp_path / "demo") == 2  # before anything is fetched or written
    assert "needs max_steps >= 22" in capsys.readouterr().out and not (tmp_path / "demo").exists()


def test_a_layout_the_ranks_cannot_hold_stops_before_the_process_group(tmp_path, monkeypatch):
    """Every rank refuses it with the message before joining the group: none is left behind in a
    collective, and the exit is the plain bad-input one (a group torn down at exit could abort)."""
    import pretrain.trainer as trainer
    from pretrain.config_loader import ConfigError, load_config
    from pretrain.demo import DEMO_CONFIG

    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(trainer, "init_distributed", lambda: pytest.fail("joined the process group"))
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not a multiple of .* = 8 x 2"):
        trainer.train(load_config(DEMO_CONFIG, [f"checkpoint.dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
