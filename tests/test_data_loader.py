"""Loader: rank partitioning, exact mid-epoch resume (also 2 ranks -> 1), mixtures, seeds.

Ranks are simulated in one process through explicit ``rank``/``world_size`` (each acts as
its own node with its own cache directory), which keeps these tests cheap.
"""
from __future__ import annotations

import pytest
from test_data_common import data_config, prepared, sample_key

from data import DataError
from data.loader import TokenLoader, data_info

BATCH = 4


def _keys(loader, max_batches=None):
    """Per-batch lists of sample identities, for up to ``max_batches`` batches."""
    out = []
    for batch in loader:
        out.append([sample_key(row) for row in batch["input_ids"]])
        if max_batches is not None and len(out) == max_batches:
            break
    return out


def _all_samples(tmp_path):
    with TokenLoader(data_config(tmp_path / "all", prepared(), drop_last=False), BATCH, shuffle=False) as ld:
        return [k for b in _keys(ld) for k in b]


def test_two_ranks_read_disjoint_samples_covering_the_epoch(tmp_path):
    everything = _all_samples(tmp_path)
    assert len(everything) % 2 == 0  # else streaming pads one rank with a repeated sample
    cfg = data_config(tmp_path, prepared())
    r0, r1 = (TokenLoader(cfg, BATCH // 2, rank=r, world_size=2) for r in (0, 1))
    a = [k for b in _keys(r0) for k in b]
    b = [k for b in _keys(r1) for k in b]
    assert len(r0) == len(r1) == len(everything) // BATCH
    assert set(a).isdisjoint(b)
    assert sorted(a + b) == sorted(everything)
    assert r0.state_dict() == r1.state_dict()  # the job's position, the same on every rank
    r0.close()
    r1.close()


def test_shuffle_is_deterministic_from_the_seed(tmp_path):
    orders = []
    for i, seed in enumerate((5, 5, 6)):
        with TokenLoader(data_config(tmp_path / str(i), prepared(), shuffle_seed=seed), BATCH) as ld:
            orders.append(_keys(ld, max_batches=20))
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    stored = _all_samples(tmp_path)
    assert orders[0] != [stored[i:i + BATCH] for i in range(0, 20 * BATCH, BATCH)]  # it does shuffle


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, workers):
    cfg = data_config(tmp_path, prepared(), num_workers=workers)
    with TokenLoader(cfg, BATCH) as ld:
        full = _keys(ld)
        state_end = ld.state_dict()
    k = 37
    with TokenLoader(cfg, BATCH) as ld:
        first = _keys(ld, max_batches=k)
        state = ld.state_dict()
    assert state["streaming"]["sample_in_epoch"] == k * BATCH
    with TokenLoader(cfg, BATCH) as ld:  # a new process in a real job: same job cache, fresh loader
        ld.load_state_dict(state)
        rest = _keys(ld)
        assert ld.state_dict() == state_end
    assert first + rest == full
    if workers == 0:  # a state saved at an epoch's end continues with the next epoch
        with TokenLoader(cfg, BATCH) as ld:
            uninterrupted = ld.forever()
            nxt = [next(uninterrupted) for _ in range(len(full) + 5)][len(full):]
        with TokenLoader(cfg, BATCH) as ld:
            ld.load_state_dict(state_end)
            resumed = ld.forever()
            assert [next(resumed)["input_ids"].tolist() for _ in range(5)] == [b["input_ids"].tolist() for b in nxt]
        assert [sample_key(r) for r in nxt[0]["input_ids"]] != full[0]  # a new epoch is reshuffled


def test_resume_from_two_ranks_on_one_rank_keeps_the_global_order(tmp_path):
    cfg = data_config(tmp_path, prepared(), num_canonical_nodes=2)

    def two_rank_steps(loaders, max_steps=None):
        per_rank = [_keys(ld, max_steps) for ld in loaders]
        return [set(a) | set(b) for a, b in zip(*per_rank)]

    ranks = [TokenLoader(cfg, BATCH // 2, rank=r, world_size=2) for r in (0, 1)]
    reference = two_rank_steps(ranks)
    for ld in ranks:
        ld.close()

    k = 25
    ranks = [TokenLoader(cfg, BATCH // 2, rank=r, world_size=2) for r in (0, 1)]
    before = two_rank_steps(ranks, k)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    for ld in ranks:
        ld.close()
    with TokenLoader(cfg, BATCH) as one:  # same global batch on one rank
        one.load_state_dict(state)
        after = [set(b) for b in _keys(one)]
    assert before == reference[:k]
    assert after == reference[k:]

    with TokenLoader(cfg, 3) as wrong:  # 3 does not divide the 4 per saved batch
        with pytest.raises(DataError, match="not a whole number of this job's batches of 3"):
            wrong.load_state_dict(state)


@pytest.mark.parametrize("before,after", [((1, 4), (1, 2)), ((1, 2), (1, 4)), ((2, 2), (2, 1)),
                                          ((1, 4), (2, 1))])
def test_resume_with_another_micro_batch_reads_the_same_samples_per_step(tmp_path, before, after):
    """(ranks, micro-batch) before and after the resume, at 4 sequences per optimizer step:
    the steps after it read the same samples as an uninterrupted run's (what lowering the
    micro-batch after running out of memory needs)."""
    cfg = data_config(tmp_path, prepared(), num_canonical_nodes=2)

    def steps(world, micro, max_steps=None, state=None):
        loaders = [TokenLoader(cfg, micro, rank=r, world_size=world) for r in range(world)]
        for ld in loaders:
            if state is not None:
                ld.load_state_dict(state)
        accum = BATCH // (micro * world)
        per_rank = [_keys(ld, None if max_steps is None else max_steps * accum) for ld in loaders]
        n = min(map(len, per_rank)) // accum
        out = [{k for batches in per_rank for b in batches[i * accum:(i + 1) * accum] for k in b} for i in range(n)]
        saved = loaders[0].state_dict()
        for ld in loaders:
            ld.close()
        return out, saved

    reference, _ = steps(*before)
    k = 7
    first, state = steps(*before, max_steps=k)
    second, _ = steps(*after, state=state)
    assert first == reference[:k]
    assert second == reference[k:] and len(second) > 10


def test_weighted_mixture_draws_the_configured_proportions(tmp_path):
    a, b = prepared(0, 40), prepared(40, 30)
    with TokenLoader(data_config(tmp_path / "a", a, drop_last=False), BATCH, shuffle=False) as ld:
        from_a = {k for batch in _keys(ld) for k in batch}
    cfg = data_config(tmp_path, a, b, weights=(3.0, 1.0), epoch_size=400)
    with TokenLoader(cfg, BATCH) as ld:
        keys = [k for batch in _keys(ld) for k in batch]
        state = ld.state_dict()
    assert len(keys) == 400
    n_a = sum(k in from_a for k in keys)
    assert n_a == 300
    info = data_info(cfg)
    assert [s["weight"] for s in info["sources"]] == [3.0, 1.0]
    with TokenLoader(data_config(tmp_path, a, b, weights=(1.0, 1.0), epoch_size=400), BATCH) as other:
        with pytest.raises(DataError, match="mixture weights"):
            other.load_state_dict(state)
        other.load_state_dict(state, strict=False)  # knowingly accepted
    with TokenLoader(data_config(tmp_path, a, b, weights=(6.0, 2.0), epoch_size=400), BATCH) as same:
        same.load_state_dict(state)  # weights are relative: 6:2 is 3:1


def test_unweighted_sources_are_read_whole_once_per_epoch(tmp_path):
    """No weights: the sources together, every sequence of each once per epoch (as one
    dataset); weights on some sources only are refused."""
    a, b = prepared(0, 40), prepared(40, 30)
    alone = []
    for i, src in enumerate((a, b)):
        with TokenLoader(data_config(tmp_path / str(i), src, drop_last=False), 1, shuffle=False) as ld:
            alone.append(sorted(k for batch in _keys(ld) for k in batch))
    with TokenLoader(data_config(tmp_path / "both", a, b, drop_last=False), 1) as ld:
        both = sorted(k for batch in _keys(ld) for k in batch)
    assert both == sorted(alone[0] + alone[1]) and len(alone[0]) != len(alone[1])
    with pytest.raises(DataError, match="give every source a weight .*or none"):
        data_info(data_config(tmp_path, a, b, weights=(1.0, None)))
    with pytest.raises(DataError, match="lists the same dataset twice"):
        TokenLoader(data_config(tmp_path / "twice", a, a), 1)


def test_validation_split_is_read_in_order_without_shuffle(tmp_path):
    cfg = data_config(tmp_path, prepared())
    with TokenLoader(cfg, 2, split="val") as ld:
        first = _keys(ld)
    with TokenLoader(cfg, 2, split="val") as ld:
        assert _keys(ld) == first and not ld.shuffle
    assert len(first) == data_info(cfg, "val")["sources"][0]["splits"]["val"]["sequences"] // 2


def test_local_datasets_are_read_in_place_and_never_written(tmp_path):
    ds = prepared()

    def snapshot():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in ds.rglob("*"))

    before = snapshot()
    orders = []
    for copy in (False, True):
        cfg = data_config(tmp_path / str(copy), ds, copy_local=copy)
        with TokenLoader(cfg, BATCH) as ld:
            orders.append(_keys(ld, max_batches=10))
        cached = list((tmp_path / str(copy) / "cache").rglob("shard.*.mds"))
        assert bool(cached) == copy
    assert orders[0] == orders[1]
    assert snapshot() == before


def test_a_validation_set_comes_from_the_sources_that_have_the_split(tmp_path):
    with_val, without = prepared(0, 40), prepared(40, 30, val_fraction=0.0)
    cfg = data_config(tmp_path, with_val, without)
    with TokenLoader(cfg, 2, split="val", skip_sources_without_split=True) as ld:
        assert [s.path for s in ld.sources] == [str(with_val)]
    with pytest.raises(DataError, match="has no split 'val'"):
        TokenLoader(data_config(tmp_path / "strict", with_val, without), 2, split="val")
    with pytest.raises(DataError, match="has no split 'val'"):  # none has it: the first one named
        TokenLoader(data_config(tmp_path / "none", without), 2, split="val", skip_sources_without_split=True)


def test_resume_refuses_a_state_saved_for_another_sample_order(tmp_path):
    """A saved position means nothing in another order: other shuffle settings or epoch size
    are refused by a strict resume and reported to the trainer as other data (so
    checkpoint.on_data_change=restart applies); a state saved before the order was recorded
    still loads, and shuffle settings do not matter to an unshuffled order."""
    from pretrain.config import RunConfig
    from pretrain.run_checks import data_changes

    base = dict(num_canonical_nodes=1)
    with TokenLoader(data_config(tmp_path / "saved", prepared(), **base), BATCH) as ld:
        _keys(ld, max_batches=5)
        state = ld.state_dict()
    assert state["order"] == {"shuffle": True, "shuffle_algo": "py1e", "shuffle_block_size": None, "epoch_size": None}
    for i, (key, value) in enumerate([("shuffle_algo", "py1s"), ("shuffle_block_size", 64), ("epoch_size", 100),
                                      ("shuffle_seed", 5), ("shuffle", False)]):
        cfg = data_config(tmp_path / str(i), prepared(), **base, **{key: value})
        with TokenLoader(cfg, BATCH) as ld:
            with pytest.raises(DataError, match=rf"another sample order \(data\.{key}: checkpoint .*, now "
                                                rf"{value!r}\).*on_data_change=restart"):
                ld.load_state_dict(state)
            ld.load_state_dict(state, strict=False)  # knowingly accepted
        run = RunConfig(data=cfg)
        run.parallel.global_batch_size = BATCH
        changes, other = data_changes({"data": state, "seq_len": cfg.seq_len, "global_batch_size": BATCH}, run,
                                      {"sources": [{"dataset_id": i, "weight": w} for i, w in state["sources"]]})
        assert other and any(c.startswith(f"data.{key}: checkpoint ") for c in changes), changes
    # streaming's own default written out is the same order (1 canonical node: 4_000_000)
    with TokenLoader(data_config(tmp_path / "explicit", prepared(), **base, shuffle_block_size=4_000_000),
                     BATCH) as ld:
        ld.load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "order"}  # saved before the order was recorded
    with TokenLoader(data_config(tmp_path / "old", prepared(), **base, shuffle_algo="py1s"), BATCH) as ld:
        ld.load_state_dict(old)
    with TokenLoader(data_config(tmp_path / "plain", prepared(), **base, shuffle=False), BATCH) as ld:
        unshuffled = ld.state_dict()
    with TokenLoader(data_config(tmp_path / "plain2", prepared(), **base, shuffle=False, shuffle_algo="py1s",
                                 shuffle_seed=5), BATCH) as ld:
        ld.load_state_dict(unshuffled)


def test_a_file_url_is_read_as_the_local_directory(tmp_path):
    """``file:///dir`` names a local dataset like ``/dir`` (config, loader and inspect alike)."""
    from data.config import DataSource, PrepareConfig, local_path
    from data.errors import DataError
    from data.manifest import read_dataset

    path = prepared()
    assert local_path(f"file://{path}") == str(path) == local_path(str(path))
    assert local_path("file://localhost/a%20b") == "/a b" and local_path("s3://bucket/x") == "s3://bucket/x"
    assert DataSource(path=f"file://{path}").path == str(path)
    with pytest.raises(ValueError, match="path: 'file://nas/x' names a directory on host 'nas'"):
        DataSource(path="file://nas/x")
    assert PrepareConfig(out=f"file://{tmp_path}/out").out == f"{tmp_path}/out"
    with pytest.raises(DataError, match="--out 'file://nas/x' names a directory on host"):
        PrepareConfig(out="file://nas/x")
    [(root, manifest)] = read_dataset(f"file://{path}", tmp_path / "meta")
    assert root == str(path) and manifest["splits"]["train"]["sequences"] > 0
    cfg = data_config(tmp_path, prepared())
    cfg.sources = [DataSource(path=f"file://{path}")]
    with TokenLoader(cfg, BATCH, shuffle=False) as by_url, \
            TokenLoader(data_config(tmp_path / "plain", prepared()), BATCH, shuffle=False) as plain:
        assert _keys(by_url, max_batches=2) == _keys(plain, max_batches=2)


def test_batches_are_pinned_where_cuda_is_unless_told(tmp_path, monkeypatch):
    import torch

    from data.loader import pin_batches

    cfg = data_config(tmp_path, prepared())
    assert cfg.pin_memory is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pin_batches(cfg)
    cfg.pin_memory = False
    assert not pin_batches(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.pin_memory = None
    assert not pin_batches(cfg)
    with TokenLoader(cfg, BATCH) as ld:
        assert ld._loader.pin_memory is False

