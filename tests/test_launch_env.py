"""launch/: node-list parsing, SLURM -> torch.distributed variables, per-job directories."""
from __future__ import annotations

import os
from pathlib import Path

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
           "SLURM_STEP_TASKS_PER_NODE": "3(x2)"}
    env.update(extra)
    return env


def test_torch_env_from_slurm_second_node():
    e = torch_env_from_slurm(_step(procid=5, localid=2, nodeid=1))
    assert e == {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "NODE_RANK": "1",
                 "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port(4242))}
    first = torch_env_from_slurm(_step(procid=0, localid=0, nodeid=0))
    assert first["LOCAL_WORLD_SIZE"] == "3" and first["MASTER_PORT"] == e["MASTER_PORT"]


@pytest.mark.parametrize("spec", ["4,2", "8(x2),4"])
def test_uneven_ranks_per_node_are_refused(spec):
    """The data loader counts nodes as world size / ranks per node: an uneven layout
    would split the data wrongly, so it stops at launch, naming the fix."""
    with pytest.raises(RuntimeError, match="uneven number of ranks per node.*use --ntasks-per-node"):
        torch_env_from_slurm(_step(0, 0, 0, SLURM_STEP_TASKS_PER_NODE=spec))


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
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))
    try:
        d = job_dirs_env({"SLURM_JOB_ID": "99", "LINRNN_LOCAL_ROOT": str(short)})
        assert d["TMPDIR"] == str(short / "linrnn-job99" / "tmp")
        assert d["LINRNN_DATA_CACHE"] == str(short / "linrnn-job99" / "data")
        assert d["TRITON_CACHE_DIR"] == str(short / f"linrnn-triton-{os.getuid()}")
        assert all(os.path.isdir(p) for p in d.values())
    finally:
        shutil.rmtree(short)
    # the user's own choices win; TMPDIR is the root when LINRNN_LOCAL_ROOT is unset
    mine = job_dirs_env({"SLURM_JOB_ID": "99", "TMPDIR": "/scratch/t", "LINRNN_DATA_CACHE": "/nvme/c",
                         "TRITON_CACHE_DIR": "/nvme/tr"}, create=False)
    assert mine == {"TMPDIR": "/scratch/t/linrnn-job99/tmp", "LINRNN_DATA_CACHE": "/nvme/c",
                    "TRITON_CACHE_DIR": "/nvme/tr"}
    # a long root: no TMPDIR under it (multiprocessing's AF_UNIX sockets need short paths)
    long_root = "/local/scratch/" + "x" * 50
    assert "TMPDIR" not in job_dirs_env({"SLURM_JOB_ID": "99", "LINRNN_LOCAL_ROOT": long_root}, create=False)


@pytest.fixture
def clean_env(monkeypatch):
    """os.environ without any torch.distributed or SLURM variable; what env_from_launcher
    writes there is undone after the test (set first, so that undo removes it)."""
    torch_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "LINRNN_MASTER_PORT", "LINRNN_MASTER_ADDR", "LINRNN_LAUNCHED", "TORCHELASTIC_RUN_ID")
    for key in [k for k in os.environ if k.startswith("SLURM_")] + list(torch_keys):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def test_plain_srun_reads_slurm_the_way_launch_does(clean_env):
    """srun without python -m launch and without --ntasks-per-node: 8 ranks on one host are
    one node of 8 (not 8 nodes), and the port is launch/'s."""
    import launch.slurm_env as slurm_env
    from pretrain.distributed import env_from_launcher

    clean_env.setattr(slurm_env.socket, "getaddrinfo", lambda host, port: [("resolved",)])  # gpu07 is not here

    for key, value in _step(5, 5, 0, SLURM_JOB_ID="54242", SLURM_NTASKS="8", SLURM_STEP_TASKS_PER_NODE="8",
                            SLURM_STEP_NODELIST="gpu07", SLURM_NNODES="1").items():
        clean_env.setenv(key, value)
    assert env_from_launcher() == (5, 8, 5, 8)
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == str(master_port(54242)) == "24242"


def test_plain_srun_refuses_uneven_nodes_as_bad_input(clean_env):
    from pretrain.config_loader import ConfigError
    from pretrain.distributed import env_from_launcher

    for key, value in _step(0, 0, 0, SLURM_STEP_TASKS_PER_NODE="4,2").items():
        clean_env.setenv(key, value)
    with pytest.raises(ConfigError, match="use --ntasks-per-node"):
        env_from_launcher()


@pytest.mark.parametrize("step_id", [None, "batch"])
def test_the_batch_script_itself_is_a_single_process(clean_env, capsys, step_id):
    """sbatch --ntasks=8 --wrap "linrnn-train ...": the batch step has SLURM_PROCID and
    SLURM_NTASKS=8, but no other rank will ever start; it must not wait for 7 of them."""
    from pretrain.distributed import env_from_launcher

    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu07",
           "SLURM_TASKS_PER_NODE": "8"}
    if step_id:
        env["SLURM_STEP_ID"] = step_id
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert env_from_launcher() == (0, 1, 0, 1)
    assert "SLURM_NTASKS=8 but this process runs outside an srun step" in capsys.readouterr().err


@pytest.mark.parametrize("local_rank,visible,index", [
    (0, 8, 0), (5, 8, 5),   # every rank sees its node's GPUs: GPU LOCAL_RANK
    (0, 1, 0), (5, 1, 0),   # --gpus-per-task=1: the one GPU it sees
])
def test_cuda_index(local_rank, visible, index):
    from pretrain.distributed import cuda_index

    assert cuda_index(local_rank, visible) == index


def test_cuda_index_refuses_a_rank_without_a_gpu_of_its_own():
    from pretrain.config_loader import ConfigError
    from pretrain.distributed import cuda_index

    with pytest.raises(ConfigError, match=r"local rank 5 sees 4 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1,2,3\).*"
                                          r"--gpus-per-task=1"):
        cuda_index(5, 4, "0,1,2,3")


def test_ranks_sharing_a_gpu_are_refused():
    """--ntasks-per-node=2 --gpus-per-node=1: both ranks see one GPU and would take it as their own."""
    from pretrain.config_loader import ConfigError
    from pretrain.distributed import check_gpus_per_rank

    with pytest.raises(ConfigError, match=r"2 ranks run on this node but the job has 1 GPU\(s\) here"):
        check_gpus_per_rank(2, "1")
    for local_world, gpus in ((8, "8"), (1, "1"), (2, None), (2, "0"), (2, "")):  # enough, or CPU / unknown
        check_gpus_per_rank(local_world, gpus)


def test_device_follows_the_same_rule(clean_env):
    """device() names the GPU init_distributed makes current: with --gpus-per-task=1 rank 3
    sees one GPU, its cuda:0."""
    import torch

    from pretrain.distributed import device

    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 1)
    clean_env.setenv("LOCAL_RANK", "3")
    assert device() == torch.device("cuda", 0)
    clean_env.setattr(torch.cuda, "device_count", lambda: 8)
    assert device() == torch.device("cuda", 3)



def test_plain_srun_ignores_torch_variables_inherited_from_the_submitting_shell(clean_env):
    """sbatch hands every task the submitting shell's environment: a MASTER_ADDR=localhost or
    RANK=0 WORLD_SIZE=1 left there from a local run must not decide the rendezvous of a
    multi-node job. Set by python -m launch (or torchrun), they count."""
    import launch.slurm_env as slurm_env
    from pretrain.distributed import env_from_launcher

    clean_env.setattr(slurm_env.socket, "getaddrinfo", lambda host, port: [("resolved",)])
    for key, value in _step(4, 1, 1, RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT="29500").items():
        clean_env.setenv(key, value)
    assert env_from_launcher() == (4, 6, 1, 3)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu07", str(master_port(4242)))
    clean_env.setenv("LINRNN_MASTER_ADDR", "10.1.0.7")  # the override for names that do not resolve
    assert env_from_launcher() == (4, 6, 1, 3) and os.environ["MASTER_ADDR"] == "10.1.0.7"
    clean_env.setenv("LINRNN_LAUNCHED", "1")  # set by launch: taken as they are
    clean_env.setenv("RANK", "2")
    assert env_from_launcher()[0] == 2


def test_a_rendezvous_host_that_does_not_resolve_is_named_with_the_fix(clean_env):
    from pretrain.distributed import LaunchError, env_from_launcher

    for key, value in _step(0, 0, 0, SLURM_STEP_NODELIST="no-such-node-x[1-2]").items():
        clean_env.setenv(key, value)
    with pytest.raises(LaunchError, match=r"'no-such-node-x1' .*does not resolve.*set LINRNN_MASTER_ADDR"):
        env_from_launcher()


def test_tasks_not_placed_in_blocks_are_refused():
    """SLURM_HOSTFILE or --distribution=cyclic put rank 0 elsewhere than on the first host,
    where every rank would wait for it."""
    with pytest.raises(RuntimeError, match=r"rank 1 \(local rank 0\) runs on gpu08, node 1 .*ranks 3..5 belong"
                                           r".*--distribution=block"):
        torch_env_from_slurm(_step(procid=1, localid=0, nodeid=1))
    # the node comes from the host's place in the step's list where SLURM names it
    with pytest.raises(RuntimeError, match="runs on gpu07, node 0"):
        torch_env_from_slurm(_step(procid=5, localid=2, nodeid=1, SLURMD_NODENAME="gpu07"))
    assert torch_env_from_slurm(_step(procid=5, localid=2, nodeid=0, SLURMD_NODENAME="gpu08"))["NODE_RANK"] == "1"


def test_two_steps_of_one_job_meet_on_different_ports():
    assert master_port(4242, 0) == master_port(4242) and master_port(4242, "1") != master_port(4242)
    assert torch_env_from_slurm(_step(0, 0, 0, SLURM_STEP_ID="1"))["MASTER_PORT"] == str(master_port(4242, 1))
