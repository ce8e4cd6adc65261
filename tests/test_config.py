"""The config schema: YAML + overrides, typed validation with clear errors, exact round trip."""
from __future__ import annotations

import math

import pytest

from pretrain.config import RunConfig
from pretrain.config_loader import (
    ConfigError,
    dump_config,
    list_model_presets,
    load_config,
    load_model_config,
    save_config,
)
from pretrain.config_cli import main as config_main

RUN_YAML = """
name: unit
max_steps: 20
model:
  preset: gated_deltaproduct-tiny
  n_layers: 3
optim:
  lr: 3e-4
  betas: [0.9, 0.98]
parallel:
  micro_batch_size: 4
  global_batch_size: 16
"""


@pytest.fixture
def run_yaml(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(RUN_YAML)
    return p


def test_yaml_preset_and_overrides(run_yaml):
    cfg = load_config(run_yaml, ["optim.lr=1e-3", "model.deltaproduct.num_householder=3", "parallel.zero_stage=2"])
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "unit" and cfg.max_steps == 20
    assert cfg.optim.lr == pytest.approx(1e-3)  # "1e-3" is a YAML string; coerced to float
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.model.n_layers == 3  # explicit key beats the preset
    assert cfg.model.deltaproduct.num_householder == 3
    assert cfg.parallel.zero_stage == 2
    preset = load_model_config("gated_deltaproduct-tiny")
    assert cfg.model.d_model == preset.d_model and cfg.model.vocab_size == preset.vocab_size


def test_save_and_reload_exactly(run_yaml, tmp_path):
    cfg = load_config(run_yaml, ["model.mamba2.dt_limit=[0.0, .inf]", "wall_clock_budget_s=3600"])
    out = tmp_path / "saved" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert math.isinf(again.model.mamba2.dt_limit[1])
    assert dump_config(again) == out.read_text()
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("modle.d_model=4", "unknown config key 'modle' (did you mean 'model'?)"),
        ("model.deltaproduct.num_heads=two", "config key 'model.deltaproduct.num_heads': expected an integer"),
        ("parallel.activation_checkpointing=3", "'parallel.activation_checkpointing': expected true or false"),
        ("optim.schedule=linear", "'optim.schedule': must be one of ['cosine', 'wsd', 'constant']"),
        ("parallel.zero_stage=4", "'parallel.zero_stage': must be <= 3, got 4"),
        ("optim.lr=-1", "'optim.lr': must be > 0.0"),
        ("optim.betas=[0.9]", "'optim.betas': expected 2 items"),
        ("parallel.global_batch_size=10", "parallel.global_batch_size: 10 must be a multiple"),
        ("model.pattern=DX", "model.pattern: 'DX' must be a non-empty string of the letters"),
        ("model.preset=gated_deltaproduct-tinyy", "did you mean 'gated_deltaproduct-tiny'"),
        ("optim=3", "'optim': expected a section"),
        ("optim.lr", "must look like key.path=value"),
        ("optim.betas=[0.9,1.5]", "optim.betas: both must lie in [0, 1), got [0.9, 1.5]"),
        ("optim.lr=.inf", "optim.lr: must be a finite number > 0"),
        ("model.mlp_expand=-1", "model.mlp_expand: must be > 0"),
        ("max_steps=2.5e1x", "'max_steps': expected an integer, got '2.5e1x'"),
        ("data.sources=[{path:/x}]", "'data.sources[0].path:/x' (YAML needs a space after ':': path: /x)"),
        ("data.sources=[{path: 'file://nas/x'}]", "config key data.sources[0].path: 'file://nas/x' names a "
                                                 "directory on host 'nas': a file:// URL must be local"),
    ],
)
def test_bad_config_names_the_key(run_yaml, override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(run_yaml, [override])
    assert fragment in str(err.value)


def test_none_and_scientific_integers_read_as_meant(run_yaml):
    """key=None means no value (YAML reads it as the text "None"); 5e7 (YAML: text) is an integer."""
    cfg = load_config(run_yaml, ["checkpoint.init_from=None", "logging.log_dir=None", "max_steps=2e3",
                                 "parallel.reduce_bucket_size=5e7", "parallel.plan_world_size=None"])
    assert cfg.checkpoint.init_from is None and cfg.logging.log_dir is None
    assert cfg.max_steps == 2000 and cfg.parallel.reduce_bucket_size == 50_000_000
    assert cfg.parallel.plan_world_size is None
    for bad, fragment in [("model.mamba2.expand=0", "mamba2.expand/d_state: must be >= 1"),
                          ("model.mamba2.d_state=0", "mamba2.expand/d_state: must be >= 1"),
                          ("model.mamba2.dt_limit=[0.1, 0.01]", "mamba2.dt_limit: need 0 <= low <= high")]:
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
            load_config(run_yaml, ["model.preset=mamba2-tiny", bad])
    with pytest.raises(ConfigError, match="model.attention.rope_theta: must be > 0"):
        load_config(run_yaml, ["model.preset=griffin-tiny", "model.attention.rope_theta=-5"])


def test_ssd_state_interval_must_be_a_multiple_of_64(run_yaml):
    cfg = load_config(run_yaml, ["model.preset=mamba2-tiny", "model.mamba2.ssd_state_every=128"])
    assert cfg.model.mamba2.ssd_state_every == 128
    with pytest.raises(ConfigError, match="mamba2.ssd_state_every: must be a positive multiple of 64, got 96"):
        load_config(run_yaml, ["model.preset=mamba2-tiny", "model.mamba2.ssd_state_every=96"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=f"does not exist \\({tmp_path}/nope.yaml\\)"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory: give a run config YAML"):
        load_config(tmp_path)  # an export or checkpoint directory, say
    with pytest.raises(ConfigError, match=r"model preset, not a run config: .*`model: \{preset: mamba2-tiny\}`"):
        load_config("configs/models/mamba2-tiny.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)


def test_presets_are_listed():
    names = list_model_presets()
    for family in ("gated_deltaproduct", "gated_deltanet", "mamba2", "griffin", "hawk"):
        for size in ("tiny", "125m", "350m", "760m", "1.3b", "2.7b", "7b"):
            assert f"{family}-{size}" in names


def test_config_cli_prints_resolved_config_and_rejects_bad_keys(run_yaml, capsys):
    assert config_main([str(run_yaml), "seed=7"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 7" in printed and "deltaproduct:" in printed
    assert config_main([str(run_yaml), "sed=7"]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err


def test_config_cli_gets_one_resolved_value(run_yaml, capsys):
    assert config_main([str(run_yaml), "checkpoint.dir=/ckpt/run a", "--get", "checkpoint.dir"]) == 0
    assert capsys.readouterr().out == "/ckpt/run a\n"  # bare, for a shell variable
    assert config_main([str(run_yaml), "--get", "optim.lr", "optim.lr=2e-4"]) == 0
    assert capsys.readouterr().out == "0.0002\n"
    assert config_main([str(run_yaml), "--get", "optim.betas"]) == 0
    assert capsys.readouterr().out == "[0.9, 0.98]\n"  # the fixture's
    assert config_main([str(run_yaml), "--get", "checkpoint.dri"]) == 2
    assert "--get checkpoint.dri: no such setting (did you mean 'checkpoint.dir'?)" in capsys.readouterr().err


def test_profile_steps_are_a_first_and_last_step(run_yaml):
    assert load_config(str(run_yaml), ["logging.profile_steps=[3, 5]"]).logging.profile_steps == [3, 5]
    for bad in ("[5, 3]", "[0, 2]", "[4]"):
        with pytest.raises(ConfigError, match=r"profile_steps: .* should be \[first, last\] steps"):
            load_config(str(run_yaml), [f"logging.profile_steps={bad}"])
