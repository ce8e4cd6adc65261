"""The LM wrapper over every family: decoding == forward, packing, pipeline layers, loss, init."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model_families import FAMILIES, small_config
from pretrain.models import (LanguageModel, build_model, count_parameters, cu_seqlens_from_lengths,
                             cu_seqlens_from_starts)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_lm(family: str, seed: int = 0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    model = build_model(small_config(family, **kw))
    with torch.no_grad():  # larger weights than the 0.02 init, so that every layer matters
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request) -> LanguageModel:
    return make_lm(request.param)


def test_prefill_and_step_equal_forward(lm: LanguageModel) -> None:
    ids = torch.randint(0, lm.config.vocab_size, (2, 13))
    full = lm(ids)
    cache = lm.init_cache(2)
    head = lm.prefill(ids[:, :6], cache)
    tail = torch.stack([lm.step(ids[:, t], cache) for t in range(6, 13)], dim=1)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-4, atol=1e-4)
    # stepping from an empty cache all the way also matches
    cache = lm.init_cache(2)
    steps = torch.stack([lm.step(ids[:, t], cache) for t in range(13)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_packed_rows_equal_separate_documents(lm: LanguageModel) -> None:
    T = 12
    lengths = [[5, 1, 6], [12]]
    ids = torch.randint(0, lm.config.vocab_size, (2, T))
    cu = cu_seqlens_from_lengths(lengths, T)
    packed = lm(ids, cu_seqlens=cu)
    flat_ids, flat_out = ids.reshape(1, -1), packed.reshape(1, 2 * T, -1)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(flat_out[:, s:e], lm(flat_ids[:, s:e]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(packed[0], lm(ids)[0], atol=1e-3)  # documents did interact unpacked


def test_mixers_refuse_a_cache_together_with_packed_documents(lm: LanguageModel) -> None:
    x = torch.randn(1, 6, lm.config.d_model)
    cu = cu_seqlens_from_lengths([[2, 4]], 6)
    for block, cache in zip(lm.blocks, lm.init_cache(1)):
        with pytest.raises(ValueError, match="pass either cache .decoding. or cu_seqlens .packed training., not both"):
            block.mixer(x, cu_seqlens=cu, cache=cache)


def test_generate_greedy_is_argmax_continuation(lm: LanguageModel) -> None:
    prompt = torch.randint(0, lm.config.vocab_size, (2, 4))
    out = lm.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, lm(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(lm.generate(prompt, 6, temperature=1.0, top_k=1), seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_layers_start_equal_to_the_lm_and_compose_to_forward(family: str) -> None:
    from pretrain.models.pipeline import build_pipeline_layers, lm_key

    cfg = dataclasses.replace(small_config(family), tie_embeddings=FAMILIES.index(family) % 2 == 0)
    lm = LanguageModel(cfg, init_seed=11)
    layers = build_pipeline_layers(cfg, base_seed=11)
    assert len(layers) == cfg.n_layers + 3
    got = {lm_key(i, name, cfg): p for i, layer in enumerate(layers) for name, p in layer.named_parameters()}
    want = dict(lm.named_parameters())
    assert sorted(got) == sorted(want)
    for name, p in want.items():
        assert torch.equal(got[name], p), name  # built apart, yet the same weights
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    cu = cu_seqlens_from_starts([[0, 4], [0, 2, 3]], 9)
    for cu_arg, empty in ((None, torch.empty(0, dtype=torch.int32)), (cu, cu)):
        x = (ids, empty)
        for layer in layers:
            x = layer(x)
        torch.testing.assert_close(x, lm(ids, cu_seqlens=cu_arg), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_made_part_by_part_has_the_weights_of_one_built_whole(family: str) -> None:
    from pretrain.models.materialize import Placement, build_model_on, unfilled_parameters
    from pretrain.models.pipeline import build_pipeline_layers

    tied = FAMILIES.index(family) % 2 == 0
    cfg = dataclasses.replace(small_config(family), tie_embeddings=tied)
    whole = LanguageModel(cfg, init_seed=7)
    for dtype in (torch.float32, torch.bfloat16):
        parts = build_model_on(cfg, Placement("cpu", dtype), init_seed=7)
        assert (parts.lm_head.weight is parts.embed.weight) == tied
        want = whole.state_dict()
        got = parts.state_dict()
        assert list(got) == list(want)
        for name, p in got.items():
            assert p.dtype == dtype and torch.equal(p, want[name].to(dtype)), name
    torch.manual_seed(3)
    drawn = build_model_on(cfg)  # no seed: one drawn from the global RNG
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(drawn.parameters(), build_model_on(cfg).parameters()))
    # Not initialised: every weight NaN until a load fills it, also in the pipeline's layers.
    empty = build_model_on(cfg, Placement("cpu", torch.bfloat16, initialise=False))
    assert unfilled_parameters(empty) == [n for n, _ in empty.named_parameters()]
    assert all(p.dtype == torch.bfloat16 for p in empty.parameters())
    empty.load_state_dict(whole.state_dict())
    assert unfilled_parameters(empty) == []
    layers = build_pipeline_layers(cfg, 7, Placement(initialise=False))
    assert all(torch.isnan(p).all() for layer in layers for p in layer.parameters())


def _drawing_rank(rank: int, port: int, out: str) -> None:
    """One of two forked ranks: build tied and untied models with the drawing shared, record
    which parts this rank drew, save the weights."""
    code = 1
    try:
        import torch.distributed as dist

        from pretrain.models import materialize as mat

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        drew: list[str] = []
        real = mat.materialize
        mat.materialize = lambda part, place, init: (place.initialise and drew.append(type(part).__name__),
                                                     real(part, place, init))
        share = mat.DrawShare((0, 1), rank)
        for family in FAMILIES[:2]:
            for tied in (True, False):
                cfg = dataclasses.replace(small_config(family), tie_embeddings=tied)
                model = mat.build_model_on(cfg, mat.Placement("cpu", torch.bfloat16), init_seed=7, share=share)
                torch.save({"drew": drew[:], "weights": model.state_dict(),
                            "tied": model.lm_head.weight is model.embed.weight}, f"{out}/{family}-{tied}-{rank}.pt")
                drew.clear()
        dist.destroy_process_group()
        code = 0
    finally:
        os._exit(code)


@pytest.mark.distributed
def test_ranks_sharing_the_drawing_get_the_weights_of_one_model_built_whole(tmp_path) -> None:
    """Two ranks draw alternate parts (embedding, blocks, final norm, untied head) and
    broadcast them: both end up with exactly the single-process weights."""
    import multiprocessing as mp

    from pretrain.distributed import free_port

    ctx, port = mp.get_context("fork"), free_port()
    procs = [ctx.Process(target=_drawing_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    for family in FAMILIES[:2]:
        for tied in (True, False):
            cfg = dataclasses.replace(small_config(family), tie_embeddings=tied)
            want = LanguageModel(cfg, init_seed=7).state_dict()
            ranks = [torch.load(tmp_path / f"{family}-{tied}-{r}.pt") for r in range(2)]
            n_parts = cfg.n_layers + (2 if tied else 3)
            assert sorted(len(r["drew"]) for r in ranks) == [n_parts // 2, n_parts - n_parts // 2]
            assert ranks[0]["drew"][0] == "Embedding" and ranks[1]["drew"][0] == "Block"
            for r in ranks:
                assert r["tied"] == tied and list(r["weights"]) == list(want)
                for name, w in r["weights"].items():
                    assert torch.equal(w, want[name].to(torch.bfloat16)), (family, tied, name)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_made_on_the_gpu_has_the_weights_drawn_on_the_host(family: str) -> None:
    from pretrain.models.materialize import Placement, build_model_on

    cfg = small_config(family)
    whole = LanguageModel(cfg, init_seed=7)
    made = build_model_on(cfg, Placement("cuda", torch.bfloat16), init_seed=7)
    for (name, want), (_, got) in zip(whole.state_dict().items(), made.state_dict().items()):
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want.to(torch.bfloat16)), name
    assert (made.lm_head.weight is made.embed.weight) == cfg.tie_embeddings


def test_init_does_not_depend_on_the_global_rng_after_the_base_seed() -> None:
    cfg = small_config(FAMILIES[0])
    a = LanguageModel(cfg, init_seed=5)
    torch.manual_seed(123)
    b = LanguageModel(cfg, init_seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    torch.manual_seed(0)
    c = LanguageModel(cfg)
    torch.manual_seed(0)
    d = LanguageModel(cfg)
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters()))
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_sampling_is_reproducible_and_stops_at_eos() -> None:
    lm = make_lm("gated_deltaproduct")
    prompt = torch.randint(0, lm.config.vocab_size, (3, 3))
    a = lm.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = lm.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = lm.generate(prompt, 8, temperature=0.0)
    eos = int(greedy[0, 4])  # row 0 produces it as its second new token
    out = lm.generate(prompt, 8, temperature=0.0, eos_id=eos)
    assert torch.equal(out[0, :5], greedy[0, :5]) and (out[0, 5:] == eos).all()
    for row in range(3):  # after the first eos a row only repeats it
        new = out[row, 3:]
        hits = (new == eos).nonzero()
        if hits.numel():
            assert (new[int(hits[0]):] == eos).all()


def test_loss_ignores_masked_labels() -> None:
    lm = make_lm("mamba2")
    ids = torch.randint(0, lm.config.vocab_size, (2, 8))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :3] = -100
    logits = lm(ids)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(lm.loss(ids, labels), expected)
    other = labels.clone()
    other[~keep] = -100
    torch.testing.assert_close(lm.loss(ids, other), expected)
    assert lm.loss(ids, torch.full_like(ids, -100)).item() == 0.0


def test_cu_seqlens_must_contain_row_boundaries() -> None:
    lm = make_lm("gated_deltanet")
    ids = torch.randint(0, lm.config.vocab_size, (2, 6))
    with pytest.raises(ValueError, match="row boundary"):
        lm(ids, cu_seqlens=torch.tensor([0, 4, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="row boundary"):
        lm(ids, cu_seqlens=torch.tensor([0, 6, 10], dtype=torch.int32))


def test_cu_seqlens_helpers() -> None:
    assert cu_seqlens_from_lengths([[2, 4], [6]], 6).tolist() == [0, 2, 6, 12]
    assert cu_seqlens_from_starts([[0, 2], [3, 6]], 6).tolist() == [0, 2, 6, 9, 12]
    padded = torch.tensor([[0, 2, -1], [1, 4, 5]])
    assert cu_seqlens_from_starts(padded, 6).tolist() == [0, 2, 6, 7, 10, 11, 12]
    with pytest.raises(ValueError, match="row 1"):
        cu_seqlens_from_lengths([[6], [2, 3]], 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_count_and_init(family: str) -> None:
    cfg = small_config(family, d_model=64, n_layers=4)
    n = count_parameters(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert n == sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight  # tied by default
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    # meta -> real storage -> init_weights gives a working model
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert meta.lm_head.weight is meta.embed.weight  # tied again after to_empty
    assert torch.isfinite(meta(torch.randint(0, cfg.vocab_size, (1, 7)))).all()
    # residual outputs are scaled down by 1/sqrt(residual additions): 2 per layer with an MLP
    # (GPT-2), 1 without (Mamba2, as mamba_ssm); other linears keep 0.02
    std = cfg.initializer_range
    branches = cfg.n_layers * (2 if model.blocks[0].mlp is not None else 1)
    assert (family == "mamba2") == (branches == cfg.n_layers)
    if family in ("gated_deltaproduct", "gated_deltanet", "mamba2"):
        w = torch.cat([b.mixer.out_proj.weight.flatten() for b in model.blocks])
        assert abs(w.std().item() / (std / math.sqrt(branches)) - 1) < 0.15
    if model.blocks[0].mlp is not None:
        w = torch.cat([b.mlp.down_proj.weight.flatten() for b in model.blocks])
        assert abs(w.std().item() / (std / math.sqrt(branches)) - 1) < 0.15
        w = torch.cat([b.mlp.up_proj.weight.flatten() for b in model.blocks])
        assert abs(w.std().item() / std - 1) < 0.15
    emb_std = model.embed.weight.std().item()
    expected = cfg.d_model**-0.5 if cfg.embedding_scale else std
    assert abs(emb_std / expected - 1) < 0.1


def test_untied_head_has_its_own_weight() -> None:
    cfg = small_config("hawk")
    cfg.tie_embeddings = False
    model = build_model(cfg)
    assert model.lm_head.weight is not model.embed.weight
    assert count_parameters(cfg) == count_parameters(small_config("hawk")) + cfg.vocab_size * cfg.d_model
    non_embedding = count_parameters(cfg, exclude_embeddings=True)
    assert non_embedding == count_parameters(small_config("hawk"), exclude_embeddings=True)
    assert non_embedding == sum(p.numel() for p in model.blocks.parameters()) + cfg.d_model  # + final norm
