"""The training loop: data -> DeepSpeed steps -> logs, validation, checkpoints, stops.

Order of business in ``train``: every check that can refuse the run (data paths, the
tokenizer against ``model.vocab_size``, an existing checkpoint directory from another run)
happens before anything is written, so bad input never touches an existing checkpoint.
Then the engine is built, the newest complete checkpoint (if any) is restored, and the
loop runs until ``max_steps``, a preemption/budget stop (save, exit 75), or too many
non-finite steps in a row (no save, exit 1).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kernels.varlen import offsets_to

from . import checkpoint as ckpt
from . import run_lock, universal
from .config import RunConfig
from .config_loader import config_to_dict, dump_config
from .distributed import DistEnv, allreduce_sum, device, env_from_launcher, init_distributed
from .engine import Engine, build_engine
from .flops import device_peak_flops, flops_per_token
from .memory import out_of_memory_message
from .models.lm import token_loss
from .optim import set_lr
from .preemption import BUDGET_REASON, REQUEUE_EXIT_CODE, StopFlag
from .profiling import MemoryHistory, StepProfiler
from .rewind import skip_request
from .bad_steps import TrainError, fp16_floor_is_divergence, skip_kind
from .run_checks import ResumePoint, check_resume, layout_line, schedule_change, start_checks
from .run_log import RunLog
from .schedule import lr_at
from .spikes import SpikeWatch, spike_message
from .stragglers import RankPace, find_stragglers, gather_paces
from .validation import Validator
from .watchdog import Watchdog, stall_forever

EXIT_OK, EXIT_FAILED = 0, 1
SLOW_RANK_S = 0.2  # faults.slow_rank: the extra time of each of that rank's forward passes


@dataclass
class TrainResult:
    status: str  # "done" | "preempted"
    step: int
    exit_code: int
    checkpoint: Path | None
    reason: str = ""


def _peak_memory_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _duration(seconds: float) -> str:
    """``3d04h``, ``2h05m``, ``4m10s`` or ``12s``: the two largest units."""
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"


class Batches:
    """Endless micro-batches of one rank (epochs chained), with the loader's resume state."""

    def __init__(self, cfg: RunConfig, batch_size: int):
        from data.loader import TokenLoader

        self.loader = TokenLoader(cfg.data, batch_size)
        self.epoch = 0
        self._it = None

    def next(self) -> dict:
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Also with another micro-batch size or rank count at the same global batch: the
        steps read the same samples (``TokenLoader.load_state_dict``)."""
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, info: dict[str, Any], resume: ResumePoint | None,
                 dog: Watchdog):
        self.cfg, self.env, self.dog = cfg, env, dog
        self.dev = device()
        self.info, self.resume = info, resume
        self.resume_from = resume.path if resume is not None else None
        self.log_dir = log_dir(cfg)
        self.log = RunLog(self.log_dir, enabled=env.is_main, tensorboard=cfg.logging.tensorboard,
                          wandb_project=cfg.logging.wandb_project, run_name=cfg.name,
                          config=config_to_dict(cfg))
        init_from = cfg.checkpoint.init_from if resume is None else None  # a run's own checkpoint wins
        self.eng: Engine = build_engine(cfg, env.world_size, init_from, restoring=resume is not None)
        # each rank's own work, compared across ranks (collective-free only with ZeRO 0-2, no pipeline)
        self.pace = RankPace(self.dev, enabled=cfg.logging.straggler_ratio is not None and env.world_size > 1
                             and not self.eng.pipelined and cfg.parallel.zero_stage < 3)
        if init_from:
            meta = info.get("init_from") or {}
            self.log.print(f"[train] weights from {init_from} (step {meta.get('step')} of its run, "
                           f"{meta.get('tokens_seen')} tokens); optimizer, schedule and data start fresh")
            if meta.get("changed_settings"):
                self.log.print("[train] model settings other than the export's ('checkpoint' being the export): "
                               + "; ".join(meta["changed_settings"]))
            if meta.get("dtype") not in (None, "fp32"):
                self.log.print(f"[train] warning: the export holds {meta['dtype']} weights: the run starts from "
                               "their rounding (export with --dtype fp32 for the exact master weights)")
        elif cfg.checkpoint.init_from:
            self.log.print(f"[train] checkpoint.init_from ({cfg.checkpoint.init_from}) is not used: the run "
                           "resumes from its own checkpoint")
        self.batches = Batches(cfg, cfg.parallel.micro_batch_size)
        self.validator = Validator(cfg, info["sources"], self.eng, env.rank, self.dev, self.log.print)
        self.step = 0
        self.tokens = 0
        self.seq_len = cfg.data.seq_len
        self.tokens_per_step = cfg.parallel.global_batch_size * self.seq_len
        self.flops = flops_per_token(cfg.model, self.seq_len)
        self.peak = device_peak_flops(cfg.parallel.precision)
        self.last_saved: int | None = None
        self.save_seconds = 0.0
        self.spikes = SpikeWatch(cfg.logging.spike_sigma)

    # ------------------------------------------------------------------ resume / save

    def restore(self) -> None:
        path = self.resume_from
        if path is None:
            return
        self.dog.beat(f"restoring the checkpoint {path}")
        started = time.perf_counter()
        if self.cfg.faults.hang_in_restore:
            stall_forever()
        state = ckpt.read_run_state(path)  # zero_stage and pipeline_stages match (run_checks)
        saved_stage = self.cfg.parallel.zero_stage
        same_world = state.get("world_size") == self.env.world_size
        # ZeRO>=1 partitions the optimizer state per rank: another rank count goes through
        # DeepSpeed's universal checkpoint (converted once, then reused); ZeRO-0 loads as is.
        # A pipeline keeps its stages (run_checks), so only its data-parallel degree changes.
        elastic = not same_world and saved_stage >= 1
        if elastic:
            stages = f" ({self.eng.num_stages} pipeline stages x {self.eng.dp_world} data-parallel)" \
                if self.eng.pipelined else ""
            self.log.print(f"[train] elastic resume: {state.get('world_size')} -> {self.env.world_size} ranks{stages}, "
                           f"ZeRO-{saved_stage} state via a universal checkpoint")
            with self.dog.paused("making the universal checkpoint"):  # its time grows with the model
                universal.ensure(path, self.env.rank, log=self.log.print)
            self.dog.beat(f"restoring the checkpoint {path}")
            started = time.perf_counter()  # the load alone stands in for a save (below)
        ckpt.load_engine_state(self.eng.engine, path, universal=elastic)
        ckpt.check_all_restored(self.eng.engine.module, path)
        rng = ckpt.load_rng_on_every_rank(path, self.env.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.step, self.tokens = state["step"], state["tokens_seen"]
        self.log.continue_after(self.step)
        self.last_saved = self.step
        # what a save takes, for the wall-clock budget until this start saves: the last run's
        # save, or this load (of the same files) if longer
        self.save_seconds = max(float(state.get("last_save_s", 0.0)), time.perf_counter() - started)
        self.spikes.restore(state)
        self.restore_data(state["data"])
        skip = skip_request(path)
        if skip:
            self.skip_data(skip)
        if self.resume is not None and self.resume.model_changes:
            changes = "; ".join(self.resume.model_changes)
            self.log.print(f"[train] warning: model settings changed at step {self.step} ({changes}): the run goes "
                           "on with the config's (checkpoint.on_model_change=allow)")
            self.log.write("model_change", self.step, changes=list(self.resume.model_changes))
        jump = schedule_change(path, self.cfg, self.step)
        if jump:
            self.log.print(f"[train] warning: {jump}")
            self.log.write("schedule_change", self.step, message=jump)
        self.log.print(f"[train] resumed from {path} at step {self.step} ({self.tokens} tokens)")
        self.log.write("resume", self.step, path=str(path), tokens_seen=self.tokens)

    def skip_data(self, steps: int) -> None:
        """Read and drop the batches of the next ``steps`` steps (``linrnn-train --rewind-to
        STEP --skip-steps M``); the step count stays, so the schedule goes on from it."""
        total = steps * self.eng.micro_batches_per_step
        self.log.print(f"[train] skipping the data of {steps} steps after step {self.step} ({total} micro-batches "
                       "per rank), as --skip-steps asked")
        start = last = time.perf_counter()
        for i in range(total):
            self.batches.next()
            now = time.perf_counter()
            if now - last >= 30 and i + 1 < total:
                self.dog.beat(f"skipping data ({i + 1}/{total} micro-batches)")
                rate = (i + 1) / (now - start)
                self.log.print(f"[train] skipped {i + 1}/{total} micro-batches, ETA {_duration((total - i - 1) / rate)}")
                last = now
        self.log.write("data_skip", self.step, steps=steps, micro_batches=total,
                       seconds=time.perf_counter() - start)

    def restore_data(self, saved: dict) -> None:
        """The data position, as ``checkpoint.on_data_change`` decided (``run_checks``)."""
        resume = self.resume
        assert resume is not None
        if resume.data == "restart":
            again = ("" if resume.other_data else
                     " The sources are unchanged: the run reads their start again (continue would read on).")
            self.log.print(f"[train] data changed at step {self.step} ({'; '.join(resume.changes)}): the data "
                           f"order starts from its beginning (checkpoint.on_data_change=restart).{again}")
            self.log.write("data_change", self.step, mode="restart", changes=list(resume.changes))
            return
        self.batches.load_state_dict(saved)
        if resume.data == "continue":
            self.log.print(f"[train] data changed at step {self.step} ({'; '.join(resume.changes)}): reading on "
                           "from the saved position (checkpoint.on_data_change=continue)")
            self.log.write("data_change", self.step, mode="continue", changes=list(resume.changes))

    def save(self) -> Path:
        cfg = self.cfg
        self.dog.beat(f"saving the checkpoint of step {self.step}")
        start = time.perf_counter()
        run_state = {
            "step": self.step, "tokens_seen": self.tokens, "data": self.batches.state_dict(),
            "tokenizer_hash": self.info["tokenizer_hash"], "model": config_to_dict(cfg.model),
            "add_bos": self.info.get("add_bos"),  # documents began with BOS: the evals start prompts so
            "world_size": self.env.world_size, "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.parallel.precision,
            "pipeline_stages": cfg.parallel.pipeline_stages,
            "global_batch_size": cfg.parallel.global_batch_size, "max_steps": cfg.max_steps,
            "seq_len": cfg.data.seq_len, "torch": torch.__version__,
            "save_id": uuid.uuid4().hex,  # tells this save from other saves of the same step (exports)
            **self.spikes.state(),  # the spike watch's history, for the resume
            "last_save_s": round(self.save_seconds, 3),  # the save before this one (or an estimate)
        }
        crash = cfg.faults.crash_in_save_at_step == self.step

        def before_marker() -> None:
            if crash:  # the fault drill: die with the files written but no marker
                os._exit(137)

        try:
            path = ckpt.save_checkpoint(self.eng.engine, cfg.checkpoint.dir, self.step, run_state,
                                        dump_config(cfg), rank=self.env.rank, keep_last=cfg.checkpoint.keep_last,
                                        keep_every=cfg.checkpoint.keep_every_steps,
                                        before_marker=before_marker if crash else None,
                                        flush=cfg.checkpoint.flush_to_storage)
        except (OSError, RuntimeError) as e:
            if not ckpt.is_write_failure(e):
                raise
            message = ckpt.save_failure_message(cfg.checkpoint.dir, self.step, self.env.rank, e)
            with contextlib.suppress(OSError):  # the log may sit on the same full disk
                self.log.write("save_failed", self.step, rank=self.env.rank, error=str(e))
            raise TrainError(message) from e
        self.last_saved = self.step
        self.save_seconds = time.perf_counter() - start
        self.log.print(f"[train] checkpoint {path} ({self.save_seconds:.1f}s)")
        self.log.write("checkpoint", self.step, path=str(path), seconds=self.save_seconds)
        return path

    # ------------------------------------------------------------------ one step

    def train_step(self) -> tuple[float, float | None, bool, int]:
        """One optimizer step over ``grad_accum`` micro-batches.

        Returns (loss, grad norm, skipped, data fingerprint); the fingerprint is the sum of
        the step's token ids over all ranks, which does not depend on how the global batch
        is split, so logs show that a resumed (or re-sized) job read the same samples."""
        e = self.eng.engine
        lr = lr_at(self.step, self.cfg.optim, self.cfg.max_steps)
        set_lr(e.optimizer, lr)
        inject_nan = self.step in self.cfg.faults.nan_loss_steps
        if self.eng.pipelined:
            return self.pipeline_step(inject_nan)
        # loss and bad-micro-batch sums stay on the device: one host sync per step, not per micro-batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        bad = torch.zeros((), dtype=torch.float64, device=self.dev)
        id_sum = 0.0
        for _ in range(self.eng.grad_accum):
            with self.pace.data():
                b = self.batches.next()
            ids = b["input_ids"].to(self.dev, non_blocking=True)
            id_sum += float(b["input_ids"].sum())
            labels = b["labels"].to(self.dev, non_blocking=True)
            cu = offsets_to(b["cu_seqlens"], self.dev)  # its values known on the host: no op reads them back
            with self.pace.forward():
                loss = e(ids, labels, cu)
                if self.cfg.faults.slow_rank == self.env.rank:
                    time.sleep(SLOW_RANK_S)
            if inject_nan:
                loss = loss * float("nan")
            value = loss.detach().double()
            finite = torch.isfinite(value)
            loss_sum += torch.where(finite, value, 0.0)
            bad += (~finite).double()
            e.backward(loss)
            if not e.is_gradient_accumulation_boundary():
                e.step()
        manual = e.zero_optimization_stage() == 0 and self.eng.dtype == torch.float32
        grad_bad = 0.0
        norm = None
        if manual:  # plain optimizer: DeepSpeed does not skip non-finite steps itself
            grads = [p.grad for p in e.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else 0.0
            grad_bad = 0.0 if math.isfinite(norm) else 1.0
        loss_sum, bad, grad_bad, id_sum = allreduce_sum(
            [loss_sum, bad, torch.tensor(grad_bad, dtype=torch.float64), torch.tensor(id_sum, dtype=torch.float64)],
            self.dev)
        skipped_before = e.skipped_steps
        if manual and (bad or grad_bad):
            for p in e.module.parameters():
                p.grad = None  # AdamW leaves parameters without gradients (and their state) alone
            clip = e._config.gradient_clipping
            e._config.gradient_clipping = 0.0  # nothing to clip (DeepSpeed's clip needs gradients)
            try:
                e.step()
            finally:
                e._config.gradient_clipping = clip
        else:
            e.step()
        skipped = bool(bad or grad_bad) or e.skipped_steps > skipped_before
        if not manual:
            g = e.get_global_grad_norm()
            norm = None if g is None else float(g)
        n = self.eng.grad_accum * self.env.world_size
        loss = loss_sum / max(n - bad, 1) if not bad else float("nan")  # finite when only a gradient was not
        return loss, norm, skipped, int(id_sum)

    def gather_pipeline(self, mine: list[dict]) -> list[tuple]:
        """Every rank's micro-batches, concatenated in stage order, on every stage of its pipeline.

        Why: the loader sees all ranks as data-parallel (the data order and its resume state
        are those of a data-parallel job of the same size), while a pipeline needs the same
        micro-batches on all its stages (the first feeds the inputs, the last the labels).
        Gathering the token ids is cheap next to the activations the stages exchange."""
        parts: list[list[dict] | None] = [None] * self.eng.num_stages
        dist.all_gather_object(parts, mine, group=self.eng.engine.grid.get_pipe_parallel_group())
        return [((b["input_ids"], b["cu_seqlens"]), b["labels"]) for part in parts for b in part or []]

    def pipeline_step(self, inject_nan: bool) -> tuple[float, float | None, bool, int]:
        """``train_step`` on a pipeline: DeepSpeed runs the micro-batches (1F1B) and steps."""
        e = self.eng.engine
        mine = [self.batches.next() for _ in range(self.eng.micro_batches_per_step)]
        id_sum = float(sum(b["input_ids"].sum() for b in mine))
        feed = iter(self.gather_pipeline(mine))
        skipped_before = e.skipped_steps
        if inject_nan:
            e.module.loss_fn = lambda logits, labels: token_loss(logits, labels) * float("nan")
        try:
            loss = float(e.train_batch(feed))
        finally:
            e.module.loss_fn = token_loss
        (id_sum,) = allreduce_sum([id_sum], self.dev)
        skipped = not math.isfinite(loss) or e.skipped_steps > skipped_before
        g = e.get_global_grad_norm()
        return loss, (None if g is None else float(g)), skipped, int(id_sum)

    # ------------------------------------------------------------------ validation

    def maybe_validate(self) -> None:
        every = self.cfg.eval.every_steps
        if every and (self.step % every == 0 or self.step == self.cfg.max_steps):
            self.dog.beat(f"validating at step {self.step}")
            val = self.validator.loss()
            if val is not None:
                self.log.print(f"[val] step {self.step}: loss {val:.4f} (ppl {math.exp(min(val, 50)):.1f})")
                self.log.write("val", self.step, loss=val)

    def report_stragglers(self) -> None:
        """Name the ranks whose own work (data, forward) was slow in the steps since the last
        report (``pretrain/stragglers.py``); collective, at the same logging step on every rank."""
        paces = gather_paces(self.pace)
        if not self.env.is_main:
            return
        first_step = self.step - paces[0][3] + 1  # the window's steps, the same on every rank
        for s in find_stragglers(paces, self.cfg.logging.straggler_ratio):
            self.log.print(f"[train] warning: {s.message(first_step, self.step)}")
            self.log.write("straggler", self.step, rank=s.rank, host=s.host, work=s.what,
                           seconds_per_step=s.seconds_per_step, median_per_step=s.median_per_step)

    # ------------------------------------------------------------------ the loop

    def watch_spikes(self, loss: float) -> None:
        spike = self.spikes.observe(self.step, loss)
        if spike is not None and self.env.is_main:
            self.log.print(f"[train] warning: {spike_message(spike, self.cfg.checkpoint.dir)}")
            self.log.write("loss_spike", self.step, loss=spike.loss, mean=spike.mean, sigmas=spike.sigmas,
                           since=spike.since, sustained=spike.sustained)

    def report_progress(self, rec: dict[str, Any], steps: int, elapsed: float) -> dict[str, Any]:
        """The progress line over the last ``steps`` steps (``elapsed`` seconds, saves and
        validations included, so the ETA holds for the steps left); returns its figures."""
        cfg = self.cfg
        tps = steps * self.tokens_per_step / max(elapsed, 1e-9)
        eta = (cfg.max_steps - self.step) * elapsed / max(steps, 1)
        mfu = tps * self.flops.train / (self.env.world_size * self.peak) if self.peak else None
        figures = {"tokens_per_s": tps, "peak_mem_gb": _peak_memory_gb(self.dev), "eta_s": round(eta, 1), "mfu": mfu}
        if self.pace.enabled:
            self.report_stragglers()
        shown_mfu = f", MFU {mfu:.1%}" if mfu is not None else ""
        norm = rec["grad_norm"]
        gn = f"{norm:.3f}" if norm is not None else "n/a"
        self.log.print(f"[train] step {self.step}/{cfg.max_steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
                       f"grad norm {gn}, {tps:,.0f} tok/s{shown_mfu}, peak mem {figures['peak_mem_gb']:.2f} GB, "
                       f"ETA {_duration(eta)}")
        return figures

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.restore()
        if self.step >= cfg.max_steps:
            self.log.print(f"[train] nothing to do: the checkpoint is at step {self.step} >= max_steps")
            return TrainResult("done", self.step, EXIT_OK, self.resume_from)
        if self.resume_from is None:
            self.log.write("start", 0, config=config_to_dict(cfg), world_size=self.env.world_size,
                           grad_accum=self.eng.grad_accum, flops_per_token=self.flops.train,
                           init_from=self.info.get("init_from"))
            self.maybe_validate()
        layout = f", {self.eng.num_stages} pipeline stages x {self.eng.dp_world} data-parallel" \
            if self.eng.pipelined else ""
        self.log.print(f"[train] {self.eng.num_parameters / 1e6:.2f}M parameters, "
                       f"{self.env.world_size} rank(s){layout}, ZeRO-{cfg.parallel.zero_stage}, {cfg.parallel.precision}, "
                       f"grad accum {self.eng.grad_accum}, {self.flops.train / 1e6:.1f} MFLOP/token (fwd+bwd)")
        bad_run = 0
        started_at = self.step
        window_t, window_steps = time.perf_counter(), 0
        step_seconds = 0.0
        profiler = StepProfiler(cfg.logging.profile_steps, self.log_dir / "profile", self.env.rank, self.log.print)
        with StopFlag(cfg.wall_clock_budget_s, self.dev) as stop, contextlib.closing(profiler):
            while self.step < cfg.max_steps:
                first = " (the first of this start: kernels compile)" if self.step == started_at else ""
                self.dog.beat(f"running step {self.step + 1}{first}")
                if cfg.faults.hang_at_step == self.step:
                    stall_forever()
                if cfg.faults.preempt_at_step == self.step and self.step > started_at:
                    stop.request("fault drill: preempt_at_step")
                reason = stop.agree(step_seconds, self.save_seconds)
                if reason == BUDGET_REASON and self.step == started_at:  # a requeue would only repeat this
                    raise TrainError(
                        f"wall_clock_budget_s={cfg.wall_clock_budget_s:g} is used up before the first step of this "
                        f"start ({time.monotonic() - stop.start:.0f} s since the process started, the save estimate "
                        f"{self.save_seconds:.0f} s): raise wall_clock_budget_s (it counts from the process's start)")
                if reason:
                    self.log.print(f"[train] stopping at step {self.step}: {reason}; saving for requeue")
                    path = self.save() if self.last_saved != self.step else ckpt.step_dir(cfg.checkpoint.dir, self.step)
                    self.log.write("preempted", self.step, reason=reason, exit_code=REQUEUE_EXIT_CODE)
                    return TrainResult("preempted", self.step, REQUEUE_EXIT_CODE, path, reason)
                t0 = time.perf_counter()
                if cfg.faults.oom_at_step == self.step:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fault drill: "
                                                 "faults.oom_at_step)")
                with profiler.step(self.step + 1), fp16_floor_is_divergence(self.step + 1):
                    loss, norm, skipped, fingerprint = self.train_step()
                self.pace.step_done()
                if self.step == started_at:  # the first step of a start compiles kernels: not compared
                    self.pace.take()
                step_seconds = time.perf_counter() - t0
                lr = lr_at(self.step, cfg.optim, cfg.max_steps)
                self.step += 1
                self.tokens += self.tokens_per_step
                window_steps += 1
                skip = skip_kind(skipped, loss, cfg.parallel.precision)
                if skip == "overflow":  # fp16: DeepSpeed skipped the step and lowered the loss scale
                    self.log.print(f"[train] step {self.step}: fp16 loss scale overflow, step skipped (DeepSpeed "
                                   "lowers the scale; not counted towards max_nonfinite_steps)")
                    self.log.write("overflow", self.step, loss=loss)
                elif skip == "non_finite":
                    bad_run += 1
                    self.log.print(f"[train] step {self.step}: non-finite loss or gradient, step skipped "
                                   f"({bad_run} in a row)")
                    self.log.write("skip", self.step, consecutive=bad_run)
                    if bad_run >= cfg.max_nonfinite_steps:
                        last = ckpt.newest_complete(cfg.checkpoint.dir)
                        raise TrainError(
                            f"{bad_run} consecutive steps had a non-finite loss or gradient (last: step "
                            f"{self.step}); stopping without saving. The last good checkpoint is "
                            f"{str(last) if last else 'none'}. Lower optim.lr, check the data, or raise "
                            "max_nonfinite_steps.")
                else:
                    bad_run = 0
                    self.watch_spikes(loss)
                    rec: dict[str, Any] = {"loss": loss, "lr": lr, "grad_norm": norm,
                                           "tokens_seen": self.tokens, "data_fingerprint": fingerprint}
                    if self.step % cfg.logging.every_steps == 0 or self.step == cfg.max_steps:
                        rec.update(self.report_progress(rec, window_steps, time.perf_counter() - window_t))
                        window_t, window_steps = time.perf_counter(), 0
                    self.log.write("train", self.step, **rec)
                # a skipped step too: validation and checkpoints keep their schedule
                self.maybe_validate()
                every = cfg.checkpoint.every_steps
                if every and self.step % every == 0 and self.step < cfg.max_steps:
                    self.save()
            path = self.save() if self.last_saved != self.step else ckpt.step_dir(cfg.checkpoint.dir, self.step)
        self.log.print(f"[train] done: {self.step} steps, {self.tokens:,} tokens; final checkpoint {path}")
        self.log.write("done", self.step, tokens_seen=self.tokens, checkpoint=str(path))
        return TrainResult("done", self.step, EXIT_OK, path)

    def close(self) -> None:
        self.batches.close()
        self.validator.close()
        self.log.close()


def log_dir(cfg: RunConfig) -> Path:
    return Path(cfg.logging.log_dir or Path(cfg.checkpoint.dir) / "logs")


def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the configured job in this process; collective over all ranks."""
    layout_line(cfg, env_from_launcher()[1])  # a layout the ranks cannot hold: refused before the group forms
    info, _ = start_checks(cfg)  # refuse bad input before touching anything
    # watched from the start: a rendezvous or a file system read can hang as well as a step
    with Watchdog(cfg.hang_timeout_s, env_from_launcher()[0]) as dog:
        dog.beat("joining the process group")
        env = init_distributed()
        return _train_in_group(cfg, info, env, dog)


def _train_in_group(cfg: RunConfig, info: dict[str, Any], env: DistEnv, dog: Watchdog) -> TrainResult:
    if cfg.parallel.pipeline_stages > 1:
        from .pipeline import check_pipeline

        check_pipeline(cfg, env.world_size)
    with dog.paused("waiting for the run lock"):  # as long as checkpoint.lock_wait_s says
        lock = run_lock.lock_for_run(cfg.checkpoint.dir, cfg.checkpoint.lock_wait_s, env.is_main)
    memory = MemoryHistory(cfg.logging.memory_snapshot, log_dir(cfg) / "memory", env.rank, print)
    trainer = None
    try:
        # again, under the lock: a job we waited for may have saved a newer checkpoint
        resume = check_resume(cfg, info)
        dog.beat("building the model, optimizer and DeepSpeed engine")
        trainer = Trainer(cfg, env, info, resume, dog)
        return trainer.run()
    except torch.OutOfMemoryError as e:
        where = f"at step {trainer.step + 1}" if trainer is not None else "while building the model and optimizer"
        newest = ckpt.newest_complete(cfg.checkpoint.dir)
        kept = f" The newest complete checkpoint, {newest}, is intact." if newest else ""
        snapshot = memory.dump("oom")
        shown = f" What held the memory: {snapshot} (open it in pytorch.org/memory_viz)." if snapshot else ""
        raise TrainError(f"rank {env.rank}: " + out_of_memory_message(cfg, where, e, newest is not None,
                                                                     env.world_size) + "."
                         + kept + shown) from e
    finally:
        memory.close()
        if trainer is not None:
            dog.beat("closing the data loader and the logs (W&B uploads what it holds)")
            trainer.close()
        run_lock.release(lock)


__all__ = ["train", "Trainer", "TrainResult", "TrainError", "EXIT_OK", "EXIT_FAILED", "REQUEUE_EXIT_CODE"]
