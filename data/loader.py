"""Per-rank, resumable batches from prepared datasets (streaming's ``StreamingDataset``).

``TokenLoader(cfg, batch_size)`` yields dicts from ``data.packing.collate_packed``:
``input_ids``/``labels`` ``[B, T]`` int64 and global ``cu_seqlens`` int32 over the
flattened batch (``data.packing.row_cu_seqlens`` splits it per row). Several sources form
a weighted mixture (streams with proportions); shuffling is deterministic from
``shuffle_seed``. ``batch_at(indices)`` reads samples by global index instead (random
access, the same on every rank; the trainer's validation set).

Resume: ``state_dict()`` records the epoch and the number of samples the whole job has
consumed (batches yielded x batch size x world size) in streaming's format. Loading it
continues the same global sample order, with no sample repeated or skipped, also with
another number of ranks as long as the global batch stays the same: streaming fixes the
order by ``num_canonical_nodes`` (stored in the state), not by the physical layout. A
global step covers the same set of samples whatever the layout; the order of samples
inside one global batch may differ. The state also records the settings that fix the
order (``order_settings``): a strict resume refuses other ones, whose order the saved
position would not fit (``order_changes``; the trainer reports them as a data change).

Local uncompressed datasets are read in place; remote or compressed ones are copied shard
by shard into a per-job, per-node cache (``cache_root/<job>/node<k>``; a job keyed by the
process id has its cache and temp directory removed when the process exits). A remote
split's downloaded index.json must be the one its manifest records (unless
``verify="none"``): else the dataset was rewritten under the reader, or damaged.

Ranks come from the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) or
from explicit ``rank``/``world_size`` arguments. Explicit ranks simulate a job in one
process (tests, benchmarks): each simulated rank acts as its own node with its own cache
directory. Every job gets its own cache directory under ``cache_root`` and its own temp
directory (``<system tmp>/linrnn-<job>``, set as this process's ``tempfile.tempdir``,
where streaming keeps its lock files); stale shared memory left by a killed job is
unlinked once per process before the first loader, and jobs that start at once on a node
take turns registering their shared memory (``data.shm.one_registration_at_a_time``).
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import DataError
from .manifest import INDEX_NAME, check_compatible, check_index, is_remote, read_dataset, verify_split
from .packing import collate_packed, example_from_sample
from .shm import clean_stale_shm, one_registration_at_a_time, release_dataset_shm

STATE_VERSION = 1
_DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_shm_cleaned = False
_system_tmp = tempfile.gettempdir()  # before any loader redirects tempfile.tempdir


def default_cache_root() -> Path:
    env = os.environ.get("LINRNN_DATA_CACHE")
    if env:
        return Path(env)
    return Path(_system_tmp) / f"linrnn-data-{os.getuid()}"


def job_id_from_env() -> str:
    """SLURM job (array task), else torchrun's rendezvous port, else this process."""
    if os.environ.get("SLURM_JOB_ID"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm{os.environ['SLURM_JOB_ID']}" + (f"-{task}" if task else "")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_PORT"):
        return f"dist{os.environ['MASTER_PORT']}"
    return f"pid{os.getpid()}"


def _use_job_tmpdir(job: str) -> str | None:
    """Point this process's temp dir (where streaming keeps its lock files) at a per-job dir.

    It lives directly in the system temp dir, not under ``cache_root``: multiprocessing puts
    AF_UNIX sockets there, whose paths must stay under ~100 characters.
    """
    path = os.path.join(_system_tmp, f"linrnn-{job}")
    if len(path) > 60:
        return None  # too long for sockets: keep the system temp dir
    os.makedirs(path, exist_ok=True)
    tempfile.tempdir = path
    return path


_cleanup_registered: set[str] = set()


def _remove_at_exit(path: Path) -> None:
    if str(path) not in _cleanup_registered:
        _cleanup_registered.add(str(path))
        atexit.register(shutil.rmtree, path, ignore_errors=True)


@contextlib.contextmanager
def _single_process_env() -> Iterator[None]:
    """Make streaming see a 1-process world while it builds a simulated rank's dataset."""
    saved = {k: os.environ.get(k) for k in _DIST_KEYS}
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class SourceInfo:
    path: str
    weight: float | None
    manifest: dict[str, Any]

    @property
    def dataset_id(self) -> str:
        return self.manifest["dataset_id"]


def open_sources(cfg: DataConfig, split: str, scratch: str | os.PathLike,
                 verify: str | None = None, skip_without_split: bool = False) -> tuple[list[SourceInfo], str]:
    """Read and check every source's manifest for ``split``; returns them and the tokenizer hash.

    Local shards are verified at ``verify`` (default ``cfg.verify``); remote ones are checked
    by streaming as they download when ``cfg.verify == "hash"``. ``skip_without_split``
    leaves out the sources that lack ``split`` (a validation set from the sources that have
    one), unless none has it.
    """
    verify = cfg.verify if verify is None else verify
    if not cfg.sources:
        raise DataError("data.sources is empty: list the prepared datasets to read, e.g. "
                        "data.sources=[{path: runs/demo/data}] (made by `linrnn-prepare prepare`)")
    expected = None
    if cfg.tokenizer:
        from .tokenizer import Tokenizer

        expected = Tokenizer.load(cfg.tokenizer).hash
    weighted = [src.weight is not None for src in cfg.sources]
    if any(weighted) and not all(weighted):
        raise DataError("data.sources: give every source a weight (a mixture), or none (each source once per "
                        "epoch, in proportion to its size)")
    infos = []
    for i, src in enumerate(cfg.sources):
        if not src.path:
            raise DataError(f"data.sources[{i}].path is empty: set it to a prepared dataset directory")
        found = read_dataset(src.path, Path(scratch) / f"manifest{i}")
        # a source prepared in parts: its weight shared by the parts' training sizes
        sizes = [m["splits"]["train"]["sequences"] for _, m in found]
        for path, manifest in found:
            if expected is None:
                expected = manifest["tokenizer"]["hash"]
            if skip_without_split and split not in manifest["splits"]:
                continue
            check_compatible(manifest, path, seq_len=cfg.seq_len, tokenizer_hash=expected, split=split)
            if not is_remote(path):
                verify_split(Path(path) / split, manifest["splits"][split], verify)
            share = None if src.weight is None else src.weight * manifest["splits"]["train"]["sequences"] / sum(sizes)
            infos.append(SourceInfo(path, share, manifest))
    assert expected is not None
    if not infos:  # skip_without_split, and no source has the split: say so for the first
        found = read_dataset(cfg.sources[0].path, Path(scratch) / "manifest0")
        check_compatible(found[0][1], found[0][0], seq_len=cfg.seq_len, tokenizer_hash=expected, split=split)
    return infos, expected


def mixture_key(sources: list) -> list[list]:
    """[dataset_id, weight] per source (``SourceInfo``, ``data_info`` dicts or saved pairs),
    as loader states compare them: one source's weight means nothing, so it reads as None;
    weights are relative, so they are normalised."""
    pairs = [[s.dataset_id, s.weight] if isinstance(s, SourceInfo) else
             [s["dataset_id"], s["weight"]] if isinstance(s, dict) else list(s) for s in sources]
    if len(pairs) == 1 or any(w is None for _, w in pairs):
        return [[i, None] for i, _ in pairs]
    total = sum(float(w) for _, w in pairs)
    return [[i, round(float(w) / total, 12)] for i, w in pairs]


def data_info(cfg: DataConfig, split: str | None = None) -> dict[str, Any]:
    """Tokenizer facts (vocab size, special ids, hash) and sizes, without building a loader."""
    with tempfile.TemporaryDirectory(prefix="linrnn-info-") as scratch:
        infos, tok_hash = open_sources(cfg, split or cfg.train_split, scratch)
    first = infos[0].manifest
    return {"tokenizer": first["tokenizer"], "tokenizer_hash": tok_hash, "seq_len": first["seq_len"],
            "dtype": first["dtype"], "add_bos": any(bool(s.manifest.get("add_bos")) for s in infos),
            "sources": [{"path": s.path, "weight": s.weight, "dataset_id": s.dataset_id,
                         "splits": s.manifest["splits"]} for s in infos]}


def order_settings(cfg: DataConfig, split: str | None = None, shuffle: bool | None = None) -> dict[str, Any]:
    """The settings besides the sources that fix a split's sample order (saved in the loader
    state; streaming's own state holds the shuffle seed and canonical node count)."""
    is_train = (split or cfg.train_split) == cfg.train_split
    return {"shuffle": (cfg.shuffle and is_train) if shuffle is None else shuffle,
            "shuffle_algo": cfg.shuffle_algo, "shuffle_block_size": cfg.shuffle_block_size,
            "epoch_size": cfg.epoch_size if is_train else None}


def order_changes(state: dict[str, Any], order: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, saved, now) for each ``order_settings`` entry a saved loader state differs in.

    Shuffle settings count only when both orders shuffle; a state saved before the order was
    recorded differs in nothing (it is resumed as before). An unset ``shuffle_block_size``
    counts as the value streaming gives it for the saved canonical node count, so writing
    that default out is no change."""
    saved = state.get("order") or {}
    shuffled = bool(saved.get("shuffle")) and bool(order.get("shuffle"))
    nodes = (state.get("streaming") or {}).get("num_canonical_nodes")

    def same(key: str, was: Any, now: Any) -> bool:
        if key == "shuffle_block_size":
            return _block_size(was, nodes) == _block_size(now, nodes)
        return was == now

    return [(k, saved[k], v) for k, v in order.items()
            if k in saved and not same(k, saved[k], v) and (shuffled or not k.startswith("shuffle_"))]


def _block_size(value: int | None, canonical_nodes: int | None) -> int:
    """streaming's shuffle block size for ``shuffle_block_size=value`` (its ``_set_shuffle_block_size``)."""
    if value is not None:
        return value
    return max(4_000_000 // canonical_nodes, 1 << 18) if canonical_nodes else 1 << 18


def pin_batches(cfg: DataConfig) -> bool:
    """``data.pin_memory``, where unset: whether CUDA is there to copy the batches to."""
    if cfg.pin_memory is not None:
        return cfg.pin_memory
    import torch

    return torch.cuda.is_available()


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """In each DataLoader worker: ignore SIGTERM and SIGUSR1. SLURM signals every process of
    a job step (scancel, preemption, a forwarded time-limit warning), and torch's workers die
    of SIGTERM, which fails the rank's next batch before it can save; the rank handles the
    stop and ends its workers itself (they also exit when the rank does)."""
    import signal

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def _make_dataset_class():
    from streaming import StreamingDataset

    class PackedSequenceDataset(StreamingDataset):
        """StreamingDataset whose samples are ``input_ids``/``labels``/``cu_seqlens`` arrays."""

        def get_item(self, idx: int) -> dict:
            return example_from_sample(super().get_item(idx))

    return PackedSequenceDataset


class TokenLoader:
    """One rank's batches over one split of the configured mixture (see module doc)."""

    def __init__(self, cfg: DataConfig, batch_size: int, *, split: str | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 num_workers: int | None = None, shuffle: bool | None = None,
                 skip_sources_without_split: bool = False) -> None:
        from streaming import Stream
        from streaming.base import distributed as sdist
        from torch.utils.data import DataLoader

        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.split = split or cfg.train_split
        self.batch_size = batch_size
        self.explicit = rank is not None or world_size is not None
        if self.explicit:
            self.world_size = 1 if world_size is None else world_size
            self.rank = rank or 0
            if not 0 <= self.rank < self.world_size:
                raise DataError(f"rank {self.rank} is outside world_size {self.world_size}")
            node = self.rank
        else:
            self.rank, self.world_size = sdist.get_rank(), sdist.get_world_size()
            node = self.rank // sdist.get_local_world_size()
        # Hashing reads every byte: one rank per node does it, the others check sizes.
        leader = self.explicit or sdist.get_local_rank() == 0
        verify = cfg.verify if leader or cfg.verify != "hash" else "size"
        is_train = self.split == cfg.train_split
        self.order = order_settings(cfg, self.split, shuffle)
        self.shuffle = self.order["shuffle"]

        job = cfg.job_id or job_id_from_env()
        self.job_dir = Path(cfg.cache_root or default_cache_root()) / job
        node_dir = self.job_dir / f"node{node}"
        job_tmp = _use_job_tmpdir(job)
        ephemeral = cfg.job_id is None and job.startswith("pid")  # nothing to reuse after exit
        if ephemeral and job_tmp:
            _remove_at_exit(Path(job_tmp))
        self._cached = False  # whether any source is copied into the job cache
        self.sources, self.tokenizer_hash = open_sources(cfg, self.split, node_dir / "meta" / self.split, verify,
                                                         skip_without_split=skip_sources_without_split)

        env = _single_process_env() if self.explicit else contextlib.nullcontext()
        with env:
            self._clean_stale_shm(leader)
            weighted = is_train and len(self.sources) > 1 and self.sources[0].weight is not None
            total_w = sum(s.weight or 0.0 for s in self.sources)
            streams = []
            for s in self.sources:
                if self._in_place(s):
                    remote, local = None, os.path.abspath(s.path)
                else:
                    remote, local = s.path, str(node_dir / s.dataset_id.split(":")[1][:16])
                    self._cached = True
                streams.append(Stream(remote=remote, local=local, split=self.split,
                                      proportion=(s.weight / total_w) if weighted else None))
            cls = _make_dataset_class()
            try:
                with one_registration_at_a_time(leader, self._job_barrier()):  # jobs starting at once on a node
                    self.dataset = cls(  # **self.order: the order settings the state records, as used
                        streams=streams, batch_size=batch_size, **self.order, shuffle_seed=cfg.shuffle_seed,
                        num_canonical_nodes=cfg.num_canonical_nodes, partition_algo="relaxed",
                        predownload=cfg.predownload,
                        cache_limit=cfg.cache_limit, download_timeout=cfg.download_timeout,
                        validate_hash="xxh64" if cfg.verify == "hash" else None)
            except ValueError as e:
                if "Reused local directory" in str(e) and len({s.dataset_id for s in self.sources}) < len(self.sources):
                    raise DataError("data.sources lists the same dataset twice (or a dataset prepared in parts "
                                    "and one of its parts): merge the entries (weights add up)") from None
                if "Reused local directory" in str(e):
                    raise DataError(f"the shard cache {str(node_dir)!r} is in use by another live loader "
                                    "of this job: close() the old TokenLoader first, or set a distinct "
                                    "data.job_id") from None
                raise
        if self.explicit:
            from streaming.base.world import World

            world = World(num_nodes=self.world_size, ranks_per_node=1, workers_per_rank=1, worker=self.rank)
            self.dataset._unique_rank_world = world
            self.dataset._parallel_rank_world = world.copy()
            self.dataset.length = math.ceil(self.dataset.epoch_size / self.world_size)

        if verify != "none":
            self._check_remote_indexes(streams)
        if self._cached and ephemeral:
            _remove_at_exit(self.job_dir)

        workers = cfg.num_workers if num_workers is None else num_workers
        self._loader = DataLoader(
            self.dataset, batch_size=batch_size, collate_fn=collate_packed, num_workers=workers,
            drop_last=cfg.drop_last, pin_memory=pin_batches(cfg), worker_init_fn=leave_stop_signals_to_the_rank,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None)
        self._batches = 0  # batches yielded since the current epoch's iteration began

    def _in_place(self, src: SourceInfo) -> bool:
        """Read a local, uncompressed dataset where it is (no copy, nothing written there)."""
        return (not is_remote(src.path) and not src.manifest.get("compression")
                and not self.cfg.copy_local and self.cfg.cache_limit is None)

    def _check_remote_indexes(self, streams: list) -> None:
        """Each remote split's downloaded index.json against its manifest (``check_index``)."""
        for src, stream in zip(self.sources, streams):
            if is_remote(src.path):
                check_index(Path(stream.local) / self.split / INDEX_NAME, src.manifest["splits"][self.split],
                            f"{src.path.rstrip('/')}/{self.split}")

    def _job_barrier(self):
        """This job's ``dist.barrier`` when its ranks are processes of a group, else None."""
        from torch import distributed as dist

        if not self.explicit and dist.is_available() and dist.is_initialized():
            return dist.barrier
        return None

    def _clean_stale_shm(self, leader: bool) -> None:
        """Once per process: one rank per node unlinks dead jobs' segments, the others wait."""
        global _shm_cleaned
        if not self.cfg.clean_stale_shm or _shm_cleaned:
            return
        if leader:
            clean_stale_shm()
        barrier = self._job_barrier()
        if barrier is not None:
            barrier()
        _shm_cleaned = True

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        """One epoch (or the rest of it, after ``load_state_dict``) of this rank's batches."""
        self._batches = 0
        for batch in self._loader:
            self._batches += 1
            yield batch

    def forever(self) -> Iterator[dict]:
        """Batches across epochs without end (each epoch reshuffled), for step-based training."""
        empty_passes = 0
        while True:
            got = False
            for batch in self:
                got = True
                yield batch
            # a state saved at an epoch's very end resumes into one empty pass; two mean no data
            empty_passes = 0 if got else empty_passes + 1
            if empty_passes >= 2:
                raise DataError(f"split {self.split!r} yields no batch of {self.batch_size} sequences: "
                                "lower the batch size or prepare more data")

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.cfg.drop_last else math.ceil(n / self.batch_size)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    # ------------------------------------------------------------------ random access

    @property
    def num_samples(self) -> int:
        """Sequences in the split, all sources together, before any rank partition or epoch size."""
        return int(self.dataset.num_samples)

    def batch_at(self, indices: Sequence[int]) -> dict:
        """The batch of the split's samples at these global indices, whatever this rank's partition.

        Why: a fixed sample list (validation) must not depend on the rank count. Index order is
        canonical: sources in config order, each in shard order, no shuffle. Remote shards are
        fetched on first access."""
        if not indices:
            raise DataError("batch_at needs at least one sample index")
        n = self.num_samples
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise DataError(f"sample index {bad[0]} is outside split {self.split!r}, which has {n} sequences")
        return collate_packed([self.dataset[int(i)] for i in indices])

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The data position of the whole job (identical on every rank)."""
        consumed = self._batches * self.global_batch_size
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.cfg.seq_len,
            "sources": [[s.dataset_id, s.weight] for s in self.sources],
            "global_batch_size": self.global_batch_size,
            "order": dict(self.order),
            "streaming": self.dataset.state_dict(consumed, from_beginning=False),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from ``state`` at the next ``__iter__``.

        The batch size and rank count may differ from the saving job's, as long as the
        position (samples consumed by all ranks) is a whole number of this job's batches
        (``batch_size x world_size``): each global batch of the saving job is then served as
        one or more whole batches here, the same samples in the same order of steps (tested
        across rank counts and batch sizes). ``strict`` refuses a state saved for other
        datasets or mixture weights, or for another order (``order_changes``, and the shuffle
        seed, which streaming would otherwise take from the state); pass False to accept it
        knowingly.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version')}, expected "
                            f"{STATE_VERSION}: it was written by another code version")
        if strict:
            if mixture_key(state["sources"]) != mixture_key(self.sources) or state["split"] != self.split:
                raise DataError("the checkpoint's data state belongs to other datasets or mixture "
                                "weights than data.sources: restore the original sources, or resume "
                                "with strict=False to restart the data order knowingly")
            self._check_same_order(state)
        position = int(state["streaming"].get("sample_in_epoch", 0))
        if position % self.global_batch_size:
            raise DataError(
                f"the checkpoint's data state is {position} sequences into its epoch (saved at "
                f"{state['global_batch_size']} per batch), not a whole number of this job's batches of "
                f"{self.global_batch_size} ({self.world_size} ranks x {self.batch_size}): choose a batch "
                f"size and rank count whose product divides {state['global_batch_size']}")
        self.dataset.load_state_dict(state["streaming"])

    def _check_same_order(self, state: dict[str, Any]) -> None:
        """Refuse a state whose sample order other settings made (its position would repeat and skip)."""
        changes = order_changes(state, self.order)
        seed = (state.get("streaming") or {}).get("shuffle_seed")
        if self.shuffle and state.get("order", {}).get("shuffle", True) and seed not in (None, self.cfg.shuffle_seed):
            changes.append(("shuffle_seed", seed, self.cfg.shuffle_seed))
        if changes:
            listed = ", ".join(f"data.{k}: checkpoint {was!r}, now {now!r}" for k, was, now in changes)
            raise DataError(f"the checkpoint's data position belongs to another sample order ({listed}), so "
                            "resuming there would repeat and skip samples: restore these settings to resume "
                            "exactly, or start the new order from its beginning (checkpoint.on_data_change="
                            "restart; strict=False here)")

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop streaming's threads and release the cache directory for a new loader."""
        ds = getattr(self, "dataset", None)
        if ds is None:
            return
        it = getattr(ds, "_iterator", None)
        if it is not None:
            it.exit()
        shm = getattr(ds, "_locals_shm", None)
        if shm is not None:
            with contextlib.suppress(Exception):
                shm.buf[:4] = b"\0\0\0\0"  # what StreamingDataset.__del__ does
        release_dataset_shm(ds)  # streaming would hold its descriptors until exit
        self.dataset = None  # type: ignore[assignment]

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
