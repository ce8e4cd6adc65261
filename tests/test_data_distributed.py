"""Two real ranks (processes, gloo, ranks from RANK/WORLD_SIZE env) read the same global order
as the in-process simulation, disjointly, and agree on the loader state."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import pytest
from test_data_common import SEQ_LEN, data_config, prepared, sample_key

from data.config import DataConfig, DataSource
from data.loader import TokenLoader


def _rank_main(rank: int, port: int, out: str, ds: str) -> None:
    """One rank of a 2-process job (forked: no re-import), ranks from the usual env vars."""
    code = 1
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=2)
        cfg = DataConfig(sources=[DataSource(path=ds)], seq_len=SEQ_LEN, cache_root=out + "/cache",
                         num_workers=0, num_canonical_nodes=2)
        loader = TokenLoader(cfg, 2)
        steps, state = [], None
        for i, batch in enumerate(loader):
            steps.append([sample_key(row).hex() for row in batch["input_ids"]])
            if i + 1 == 10:
                state = loader.state_dict()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"steps": steps, "state": state, "job": str(loader.job_dir)}, f)
        loader.close()
        dist.destroy_process_group()
        code = 0
    finally:
        os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_match_the_simulated_ranks(tmp_path):
    ds = prepared()
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path), str(ds))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert runs[0]["state"] == runs[1]["state"] and runs[0]["state"]["streaming"]["sample_in_epoch"] == 40
    assert runs[0]["job"] == runs[1]["job"]  # one job directory for the ranks of a node
    real = [set(a) | set(b) for a, b in zip(runs[0]["steps"], runs[1]["steps"])]
    flat = [k for r in runs for s in r["steps"] for k in s]
    assert len(flat) == len(set(flat))  # disjoint

    cfg = data_config(tmp_path, ds, num_canonical_nodes=2)
    sims = [TokenLoader(cfg, 2, rank=r, world_size=2) for r in (0, 1)]
    per_rank = [[[sample_key(x).hex() for x in b["input_ids"]] for b in ld] for ld in sims]
    for ld in sims:
        ld.close()
    simulated = [set(a) | set(b) for a, b in zip(*per_rank)]
    assert real == simulated
