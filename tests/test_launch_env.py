"""launch/: node-list parsing, SLURM -> torch.distributed variables, per-job directories."""
from __future__ import annotations

import os

import pytest

from launch.nodelist import expand_nodelist, expand_tasks_per_node
from launch.slurm_env import (PORT_BASE, PORT_SPAN, in_srun_step, job_dirs_env, master_port,
                              torch_env_from_slurm)


@pytest.mark.parametrize("text,hosts", [
    ("node[01-03,07],gpu-a1", ["node01", "node02", "node03", "node07", "gpu-a1"]),
    ("vm", ["vm"]),
    ("a1,b2", ["a1", "b2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("x[1-5:2]", ["x1", "x3", "x5"]),
    ("gpu[3],cpu[1-2]", ["gpu3", "cpu1", "cpu2"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01]", "n[a-b]", "n[5-3]", "n[]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")


def _step(procid: int, localid: int, nodeid: int, **extra) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": "6",
           "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
           "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_STEP_NODELIST": "gpu[07-08]",
           "SLURM_STEP_TASKS_PER_NODE": "4,2"}
    env.update(extra)
    return env


def test_torch_env_from_slurm_second_node():
    e = torch_env_from_slurm(_step(procid=5, localid=1, nodeid=1))
    assert e == {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
                 "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port(4242))}
    first = torch_env_from_slurm(_step(procid=0, localid=0, nodeid=0))
    assert first["LOCAL_WORLD_SIZE"] == "4" and first["MASTER_PORT"] == e["MASTER_PORT"]


def test_torch_env_uses_job_nodelist_without_step_list_and_port_override():
    env = _step(0, 0, 0, LINRNN_MASTER_PORT="23456")
    del env["SLURM_STEP_NODELIST"], env["SLURM_STEP_TASKS_PER_NODE"]
    env["SLURM_TASKS_PER_NODE"] = "2(x3)"
    e = torch_env_from_slurm(env)
    assert e["MASTER_ADDR"] == "gpu07" and e["MASTER_PORT"] == "23456" and e["LOCAL_WORLD_SIZE"] == "2"


def test_torch_env_node_agents():
    env = _step(1, 0, 1, SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    e = torch_env_from_slurm(env, nproc_per_task=4)
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) == ("4", "8", "4")
    with pytest.raises(RuntimeError, match="one task per node"):
        torch_env_from_slurm(_step(1, 1, 0), nproc_per_task=4)


def test_torch_env_outside_slurm_fails_clearly():
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        torch_env_from_slurm({"SLURM_JOB_ID": "1"})


def test_master_port_range_and_stability():
    ports = {master_port(j) for j in range(100000, 100000 + PORT_SPAN)}
    assert len(ports) == PORT_SPAN and min(ports) == PORT_BASE and max(ports) < 32768
    assert master_port("77") == master_port(77)


def test_in_srun_step():
    assert in_srun_step(_step(0, 0, 0))
    assert not in_srun_step({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "batch"})
    assert not in_srun_step({"SLURM_JOB_ID": "1"})
    assert not in_srun_step({})


def test_job_dirs(tmp_path):
    env = {"SLURM_JOB_ID": "99", "LINRNN_LOCAL_ROOT": str(tmp_path)}
    d = job_dirs_env(env)
    assert d["TMPDIR"] == str(tmp_path / "linrnn-job99" / "tmp")
    assert d["LINRNN_DATA_CACHE"] == str(tmp_path / "linrnn-job99" / "data")
    assert d["TRITON_CACHE_DIR"] == str(tmp_path / f"linrnn-triton-{os.getuid()}")
    assert all(os.path.isdir(p) for p in d.values())
    # the user's own choices win; TMPDIR is the root when LINRNN_LOCAL_ROOT is unset
    mine = job_dirs_env({"SLURM_JOB_ID": "99", "TMPDIR": str(tmp_path / "t"), "LINRNN_DATA_CACHE": "/nvme/c",
                         "TRITON_CACHE_DIR": "/nvme/tr"}, create=False)
    assert mine == {"TMPDIR": str(tmp_path / "t" / "linrnn-job99" / "tmp"), "LINRNN_DATA_CACHE": "/nvme/c",
                    "TRITON_CACHE_DIR": "/nvme/tr"}
