"""The rules a resume follows (``pretrain.run_checks``): what may change between a
checkpoint and the config that resumes it (rank count, pipeline stages, data, model
settings, schedule), checked on hand-made checkpoint directories. No process group, no
DeepSpeed engine."""
from __future__ import annotations

import pytest

from pretrain import checkpoint as ckpt
from pretrain.config_loader import ConfigError, load_config, load_model_config


def test_resume_refuses_another_pipeline_stage_count(tmp_path):
    import json

    from pretrain.config_loader import config_to_dict
    from pretrain.run_checks import check_resume

    over = ["parallel.zero_stage=1", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
            f"checkpoint.dir={tmp_path}"]
    cfg = load_config(None, over + ["parallel.pipeline_stages=2"])
    d = ckpt.step_dir(tmp_path, 4)
    d.mkdir()
    state = {"model": config_to_dict(cfg.model), "tokenizer_hash": "h", "zero_stage": 1, "world_size": 4,
             "global_batch_size": 8}
    (d / "run.json").write_text(json.dumps({**state, "pipeline_stages": 2}))
    (d / ckpt.MARKER).write_text("ok")
    info = {"tokenizer_hash": "h", "sources": []}
    assert check_resume(cfg, info).path == d  # same stages: any rank count (data-parallel degree)
    for stages in (1, 4):
        with pytest.raises(ckpt.CheckpointError, match=r"step_00000004.*saved with parallel.pipeline_stages=2, "
                           rf"the config says {stages}: .*only the data-parallel degree.*set "
                           r"parallel.pipeline_stages=2 to resume"):
            check_resume(load_config(None, over + [f"parallel.pipeline_stages={stages}"]), info)
    (d / "run.json").write_text(json.dumps(state))  # a run.json from before pipelines: one stage
    with pytest.raises(ckpt.CheckpointError, match="saved with parallel.pipeline_stages=1, the config says 2"):
        check_resume(cfg, info)


def test_every_rank_resumes_from_the_checkpoint_rank_0_found(tmp_path, monkeypatch):
    """A rank that sees another newest checkpoint than rank 0 (a stale NFS cache, a node-local
    checkpoint.dir) takes rank 0's when it can see it, and otherwise stops with the cause."""
    import pretrain.distributed as distributed
    from pretrain.run_checks import agreed_newest

    for step in (2, 4):
        ckpt.step_dir(tmp_path, step).mkdir()
        (ckpt.step_dir(tmp_path, step) / ckpt.MARKER).write_text("ok")
    assert agreed_newest(tmp_path) == ckpt.step_dir(tmp_path, 4)  # no process group: its own
    rank0 = {"saw": ""}
    monkeypatch.setattr(distributed, "broadcast_from_rank0", lambda value: rank0["saw"] or value)
    rank0["saw"] = str(ckpt.step_dir(tmp_path, 2))  # rank 0's listing is older: its choice wins
    assert agreed_newest(tmp_path) == ckpt.step_dir(tmp_path, 2)
    rank0["saw"] = str(tmp_path / "step_00000006")  # newer than this rank can see
    with pytest.raises(ckpt.CheckpointError, match=r"rank 0 resumes from .*step_00000006, but rank 0 sees "
                       r".*step_00000004 in checkpoint.dir .*: the nodes see different contents there; put "
                       r"checkpoint.dir on a file system that every node shares"):
        agreed_newest(tmp_path)
    monkeypatch.setattr(distributed, "broadcast_from_rank0", lambda value: "")  # rank 0 sees none
    with pytest.raises(ckpt.CheckpointError, match=r"rank 0 resumes from nothing \(a fresh start\)"):
        agreed_newest(tmp_path)
    # this rank agrees, another does not: every rank stops (none waits in the next collective)
    monkeypatch.setattr(distributed, "broadcast_from_rank0", lambda value: value)
    monkeypatch.setattr(distributed, "ranks_failing", lambda failed: int(failed) + 1)
    with pytest.raises(ckpt.CheckpointError, match=r"1 other rank\(s\) see other checkpoints than rank 0 .*their "
                       r"messages name them.*every node shares"):
        agreed_newest(tmp_path)


def test_a_resume_on_other_data_follows_on_data_change(tmp_path):
    """Unchanged data resumes exactly whatever the setting (so it can stay on through
    requeues); a new global batch may continue, other sources or lengths may restart."""
    import json

    from pretrain.config_loader import config_to_dict
    from pretrain.run_checks import check_resume

    over = ["parallel.micro_batch_size=2", "parallel.global_batch_size=8", "data.seq_len=128",
            f"checkpoint.dir={tmp_path}"]
    cfg = load_config(None, over)
    d = ckpt.step_dir(tmp_path, 4)
    d.mkdir()
    (d / "run.json").write_text(json.dumps({
        "model": config_to_dict(cfg.model), "tokenizer_hash": "h", "zero_stage": 1, "precision": "bf16",
        "global_batch_size": 8, "seq_len": 128,
        "data": {"split": "train", "sources": [["ds:a", 1.0]], "seq_len": 128,
                 "streaming": {"shuffle_seed": 17, "num_canonical_nodes": 2}}}))
    (d / ckpt.MARKER).write_text("ok")
    a = {"tokenizer_hash": "h", "sources": [{"dataset_id": "ds:a", "weight": 2.0}]}  # one source: weight moot
    b = {"tokenizer_hash": "h", "sources": [{"dataset_id": "ds:a", "weight": 1.0},
                                            {"dataset_id": "ds:b", "weight": 1.0}]}
    policies = ("refuse", "continue", "restart")
    for policy in policies:
        point = check_resume(load_config(None, over + [f"checkpoint.on_data_change={policy}"]), a)
        assert (point.path, point.data, point.changes) == (d, "exact", ())
    bigger = over + ["parallel.global_batch_size=16"]
    with pytest.raises(ckpt.CheckpointError, match=r"other data than the config's \(parallel.global_batch_size: "
                       r"checkpoint 8, config 16\).*checkpoint.on_data_change=continue to read on"):
        check_resume(load_config(None, bigger), a)
    point = check_resume(load_config(None, bigger + ["checkpoint.on_data_change=continue"]), a)
    assert point.data == "continue" and not point.other_data
    point = check_resume(load_config(None, bigger + ["checkpoint.on_data_change=restart"]), a)
    assert point.data == "restart" and not point.other_data
    assert check_resume(load_config(None, over + ["data.num_canonical_nodes=2"]), a).data == "exact"
    for change, info in (([], b), (["data.seq_len=256"], a), (["data.shuffle_seed=5"], a),
                         (["data.num_canonical_nodes=4"], a)):
        with pytest.raises(ckpt.CheckpointError, match="other data.*on_data_change=restart to train on the new data"):
            check_resume(load_config(None, over + change), info)
        with pytest.raises(ckpt.CheckpointError, match="continue keeps the saved data position.*set "
                           "checkpoint.on_data_change=restart"):
            check_resume(load_config(None, over + change + ["checkpoint.on_data_change=continue"]), info)
        point = check_resume(load_config(None, over + change + ["checkpoint.on_data_change=restart"]), info)
        assert point.data == "restart" and point.other_data
    point = check_resume(load_config(None, over + ["checkpoint.on_data_change=restart"]), b)
    assert point.changes == ("data.sources: checkpoint [ds:a], config [ds:a x0.5, ds:b x0.5]",)
    # a two-source run saved with equal weights, resumed with unweighted sources (read by size)
    state = json.loads((d / "run.json").read_text())
    state["data"]["sources"] = [["ds:a", 1.0], ["ds:b", 1.0]]
    (d / "run.json").write_text(json.dumps(state))
    unweighted = {"tokenizer_hash": "h", "sources": [{"dataset_id": "ds:a", "weight": None},
                                                     {"dataset_id": "ds:b", "weight": None}]}
    with pytest.raises(ckpt.CheckpointError, match="without weights read in proportion to their sizes"):
        check_resume(load_config(None, over), unweighted)
    assert check_resume(load_config(None, over), b).data == "exact"
    with pytest.raises(ConfigError, match="on_data_change"):
        load_config(None, over + ["checkpoint.on_data_change=skip"])


def test_a_resume_that_moves_the_learning_rate_is_named(tmp_path):
    from pretrain.config_loader import dump_config
    from pretrain.run_checks import schedule_change

    base = ["max_steps=1000", "optim.warmup_steps=10", "optim.lr=1e-3"]
    for schedule in ("cosine", "wsd"):
        saved = load_config(None, base + [f"optim.schedule={schedule}"])
        (tmp_path / "config.yaml").write_text(dump_config(saved))
        assert schedule_change(tmp_path, saved, 500) is None
        longer = load_config(None, base + [f"optim.schedule={schedule}", "max_steps=2000"])
        jump = schedule_change(tmp_path, longer, 500)
        if schedule == "wsd":  # extending a stable phase moves nothing
            assert jump is None
        else:
            assert jump == ("the learning rate of step 500 is 0.000872 under this config's schedule, 0.000557 "
                            "under the checkpoint's (max_steps 1000 -> 2000): the run continues on the new "
                            "schedule from there")
    lower = load_config(None, base + ["optim.schedule=wsd", "optim.lr=5e-4"])
    assert "optim.lr 0.001 -> 0.0005" in schedule_change(tmp_path, lower, 500)
    (tmp_path / "config.yaml").write_text("optim: [")
    assert schedule_change(tmp_path, lower, 500) is None  # unreadable: no claim


def test_a_resume_may_change_model_settings_that_keep_the_shapes_when_allowed(tmp_path):
    import json

    from pretrain.config_loader import config_to_dict
    from pretrain.run_checks import check_resume

    over = ["model.preset=griffin-tiny", f"checkpoint.dir={tmp_path}"]
    cfg = load_config(None, over)
    d = ckpt.step_dir(tmp_path, 4)
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"model": config_to_dict(cfg.model), "tokenizer_hash": "h"}))
    (d / ckpt.MARKER).write_text("ok")
    info = {"tokenizer_hash": "h", "sources": []}
    longer = over + ["model.attention.window=4096", "model.attention.rope_theta=500000"]
    with pytest.raises(ckpt.CheckpointError, match=r"another model \(model.attention.rope_theta: .*; "
                       r"model.attention.window: checkpoint \d+, config 4096\).*on_model_change=allow"):
        check_resume(load_config(None, longer), info)
    point = check_resume(load_config(None, longer + ["checkpoint.on_model_change=allow"]), info)
    assert [c.split(":")[0] for c in point.model_changes] == ["model.attention.rope_theta", "model.attention.window"]
    with pytest.raises(ckpt.CheckpointError, match="another model .*d_model.*resume that run$"):
        check_resume(load_config(None, over + ["model.d_model=96", "checkpoint.on_model_change=allow"]), info)
    assert check_resume(cfg, info).model_changes == ()


def test_model_diffs_ignore_compute_only_settings_and_read_missing_ones_as_defaults():
    """A resume may change how results are computed (fewer saved SSD states after an OOM),
    and reads a checkpoint written before a setting existed as that setting's default."""
    from pretrain.config_loader import config_to_dict
    from pretrain.run_checks import model_diffs

    saved = config_to_dict(load_model_config("mamba2-tiny", []))
    now = config_to_dict(load_model_config("mamba2-tiny", ["mamba2.ssd_state_every=128"]))
    assert model_diffs(saved, now) == []
    del saved["mamba2"]["ssd_state_every"], saved["mlp_expand"]  # written by older code
    assert model_diffs(saved, now) == []
    wider = config_to_dict(load_model_config("mamba2-tiny", ["mlp_expand=8"]))
    assert model_diffs(saved, wider) == ["model.mlp_expand: checkpoint 4.0, config 8.0"]


def test_precision_of_an_older_checkpoint_comes_from_its_config(tmp_path):
    from pretrain.run_checks import _saved_precision

    (tmp_path / "config.yaml").write_text("parallel: {zero_stage: 1, precision: fp32}\n")
    assert _saved_precision(tmp_path) == "fp32"
    assert _saved_precision(tmp_path / "missing") is None
