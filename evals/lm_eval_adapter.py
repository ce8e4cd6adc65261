"""lm-evaluation-harness adapter: an exported checkpoint as ``--model linrnn``.

    python -m evals.lm_eval_adapter run --model linrnn --model_args pretrained=EXPORT_DIR \
        --device cuda --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande,wikitext

(``--device`` and ``--batch_size`` go to lm_eval's own flags, not into ``--model_args``;
``max_length`` (default: the run's data.seq_len) and ``max_gen_toks`` may go there.)

(importing this module registers the model; the module's ``main`` then hands the command
line to lm_eval's own CLI). Needs ``pip install lm_eval`` (optional dependency).

Scoring uses right-padded batches: the models are causal, so padding after a sequence
never changes its earlier outputs. Generation uses the recurrent step path (prefill, then
one ``step`` per token on a fixed-size state).

Data parallel: started as N ranks (``python -m launch --nproc N -- linrnn-lm-eval run ...``,
or srun), each rank loads the model on its own GPU, lm_eval gives each rank every N-th
document, and the adapter's collectives (gloo) gather the scores on rank 0, which reports.

``score`` is the checkpoint-suite form (``linrnn-eval EXPORT --suite lm_eval:TASK,TASK``, and
so ``slurm/eval.sbatch`` and the eval sweep): ``results.json`` (each task's metrics) and a
Markdown table in the output directory, beside the other suites' results.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint
from .hub_probe import offline_if_hub_unreachable
from .prompts import PromptCoder
from .report import write_json, write_text
from .sharding import rank_device, shard_from_env


@register_model("linrnn")
class LinRNNLM(LM):
    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, **_: Any) -> None:
        super().__init__()
        self._shard = shard_from_env()
        self._rank, self._world_size = self._shard.rank, self._shard.world
        dev = rank_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ck = load_checkpoint(pretrained, device=dev)
        self.model, self.tok = ck.model.eval(), ck.tokenizer
        self.coder = PromptCoder(ck.tokenizer, ck.bos)  # documents start as in training
        self._dev = self._device = torch.device(dev)  # lm_eval's ``device`` reads _device
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or ck.train_context or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.meta = ck.meta  # export.json: the step and tokens seen

    # ------------------------------------------------------------------ tokens

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """Sum log-prob of each continuation and whether greedy decoding produces it."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for b in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False, disable=len(order) < 50):
            idx = order[b:b + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in idx]
            width = max(len(s) for s in seqs) - 1
            # right padding: causal, so its value never reaches a scored position (pad_id may be -1)
            inp = torch.full((len(idx), width), max(self.tok.pad_id, 0), dtype=torch.long)
            for r, s in enumerate(seqs):
                inp[r, : len(s) - 1] = torch.tensor(s[:-1])
            logp = F.log_softmax(self.model(inp.to(self._dev)).float(), dim=-1).cpu()
            for r, (i, s) in enumerate(zip(idx, seqs)):
                n = min(len(pairs[i][1]), len(s) - 1)  # a continuation longer than the window: its tail
                if n == 0:
                    continue
                tgt = torch.tensor(s[-n:])
                rows = logp[r, len(s) - 1 - n: len(s) - 1]
                out[i] = (float(rows.gather(1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all()))
        return out

    # ------------------------------------------------------------------ ranks (lm_eval's hooks)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated in rank order (a scalar counts as one element)."""
        if self._world_size == 1:
            return tensor
        import torch.distributed as dist

        flat = tensor.detach().reshape(-1).cpu()  # the gloo group moves host tensors
        parts = [torch.empty_like(flat) for _ in range(self._world_size)]
        dist.all_gather(parts, flat, group=self._shard.group)
        return torch.cat(parts).to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list | None = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self._shard.group)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._shard.group)

    # ------------------------------------------------------------------ lm_eval API

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self.coder.split(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                # the first token needs something to be predicted from: the coder's anchor (BOS
                # where training had it, else the EOS that ends the document before each one)
                token_list=self.tok.encode(text), prefix_token=self.coder.anchor,
                max_seq_len=self.max_length, context_len=1)]
            results.append(sum(lp for lp, _ in self._score(windows, "rolling")))
        return results

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in tqdm(requests, desc="generate", leave=False, disable=disable_tqdm or len(requests) < 20):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            results.append(self.generate(context, until, max_new, temperature))
        return results

    def generate(self, context: str, until: list[str], max_new: int, temperature: float = 0.0) -> str:
        """Decode with the recurrent cache until a stop string, EOS, or ``max_new`` tokens."""
        ids = self.coder.document(context)[-self.max_length:]
        cache = self.model.init_cache(1, device=self._dev)
        logits = self.model.prefill(torch.tensor([ids], device=self._dev), cache)[:, -1]
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            if temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1))
            else:
                nxt = int(logits.argmax(-1))
            if nxt == self.tok.eos_id:
                break
            new.append(nxt)
            text = self.tok.decode(new)
            if any(u in text for u in until):
                break
            logits = self.model.step(torch.tensor([nxt], device=self._dev), cache)
        for u in until:
            if u and u in text:
                text = text[: text.index(u)]
        return text


class HubUnreachableError(ValueError):
    """A task's dataset is neither in the Hugging Face cache nor downloadable (compute nodes
    often have no network): a setup step, said in one line by the CLIs (exit 2)."""


def hub_unreachable(e: BaseException) -> bool:
    """Whether ``e`` is datasets / huggingface_hub / requests failing to reach the Hub (or
    refusing to, in offline mode), not any other failure."""
    import importlib

    kinds: list[type] = []
    for module, names in (("huggingface_hub.errors", ("OfflineModeIsEnabled", "LocalEntryNotFoundError")),
                          ("requests", ("ConnectionError", "Timeout")),
                          ("httpx", ("ConnectError", "TimeoutException"))):
        try:  # each library only where installed: an ImportError here would hide the real error
            kinds += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            pass
    # datasets re-raises as a plain ConnectionError (BrokenPipeError and its kin are not this)
    return type(e) is ConnectionError or isinstance(e, tuple(kinds))


def _loading_task(e: BaseException) -> str | None:
    """The task whose dataset was loading when ``e`` was raised (its Task is on the traceback)."""
    from lm_eval.api.task import Task

    tb, name = e.__traceback__, None
    while tb is not None:
        task = tb.tb_frame.f_locals.get("self")
        if isinstance(task, Task) and getattr(getattr(task, "config", None), "task", None):
            name = str(task.config.task)
        tb = tb.tb_next
    return name


def hub_message(e: BaseException, tasks: list[str]) -> str:
    """One line: which task, why (its dataset comes from the Hub), and how to fix it on a cluster."""
    from datasets import config

    task = _loading_task(e)
    names = [task] if task else tasks or ["TASK"]
    return (f"lm_eval task {', '.join(map(repr, names))}: its dataset comes from the Hugging Face "
            f"Hub and is neither reachable from here nor in the cache {config.HF_DATASETS_CACHE} ({e}). Download "
            "it once on a machine with network (e.g. a login node) into a cache the compute nodes share: "
            "HF_HOME=/shared/hf python -c \"from lm_eval.tasks import TaskManager; "
            f"TaskManager().load({names!r})\", then run with HF_HOME=/shared/hf HF_DATASETS_OFFLINE=1 "
            "(or HF_DATASETS_CACHE=DIR both times; see slurm/README.md)")


def score(export: str, tasks: list[str], out: Path, *, device: str | None = None, batch_size: int = 8,
          num_fewshot: int | None = None, limit: float | None = None, include_path: str | None = None,
          bootstrap_iters: int = 100000) -> dict[str, Any] | None:
    """lm_eval ``tasks`` on an export, written to ``out/results.json`` and ``results.md`` by rank
    0 (which returns them; other ranks return None). An unknown task is a ValueError, a dataset
    that is neither cached nor downloadable a HubUnreachableError (one too)."""
    offline_if_hub_unreachable()  # before lm_eval imports datasets
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.time()
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm_eval has no task {unknown[0]!r} (`lm-eval ls tasks` lists them; --lm-eval-include "
                         "adds a folder of task YAMLs)")
    lm = LinRNNLM(pretrained=export, device=device, batch_size=batch_size)
    try:
        res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              bootstrap_iters=bootstrap_iters, log_samples=False)
    except Exception as e:
        if not hub_unreachable(e):  # only the Hub's download errors are a setup step to explain
            raise
        raise HubUnreachableError(hub_message(e, tasks)) from None
    if res is None:  # not rank 0: lm_eval gathered this rank's scores there
        return None
    scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}  # not the alias
              for task, metrics in res["results"].items()}
    meta = lm.meta
    result = {"kind": "lm_eval", "checkpoint": export, "meta": meta, "complete": True, "tasks": tasks,
              "ranks": lm.world_size, "device": str(lm.device), "lm_eval": lm_eval_version,
              "num_fewshot": num_fewshot, "limit": limit, "n_shot": res.get("n-shot"),
              "wall_time_s": round(time.time() - start, 1), "results": scores}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    rows = [f"| {task} | {name.split(',')[0]} | {value:.4f} |" for task, metrics in scores.items()
            for name, value in metrics.items() if "_stderr" not in name]
    write_text(out / "results.md", "\n".join([f"# lm-evaluation-harness: {export}", "",
                                                f"- step: {meta.get('step', 'unknown')}; lm_eval {lm_eval_version}; "
                                                f"{lm.world_size} rank(s) on {lm.device}", "",
                                                "| task | metric | value |", "|---|---|---|", *rows, ""]))
    return result


def main() -> int:
    """lm_eval's CLI with the ``linrnn`` model registered; a bad checkpoint or a dataset the
    Hub cannot give is one line, exit 2."""
    offline_if_hub_unreachable()  # before lm_eval imports datasets
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except CheckpointError as e:
        print(f"linrnn-lm-eval: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not hub_unreachable(e):
            raise
        print(f"linrnn-lm-eval: error: {hub_message(e, [])}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
