"""How a checkpoint evaluation's items split over ranks and merge back: every rank's share,
the leading consecutive items after a time limit, and decisions all ranks share. The other
rank is played by a stand-in gather (the real two-process run is in
test_evals_checkpoint.py)."""
from __future__ import annotations

import pytest

from evals.sharding import Shard

PAST = -1.0  # a deadline already over (time.monotonic() is never negative)


class WithPartner(Shard):
    """Rank ``rank`` of two; the other rank's contributions to each gather are given in order."""

    def __init__(self, rank: int, partner: list) -> None:
        super().__init__(rank, 2)
        object.__setattr__(self, "partner", list(partner))

    def _all(self, value):
        other = self.partner.pop(0)
        return [value, other] if self.rank == 0 else [other, value]


def test_one_rank_scores_everything_in_order() -> None:
    seen = []
    scores, stopped = Shard().score(range(5), lambda i: seen.append(i) or i * 10, progress=False)
    assert scores == [0, 10, 20, 30, 40] and seen == [0, 1, 2, 3, 4] and not stopped


def test_each_rank_scores_every_other_item_and_gets_all_scores_in_item_order() -> None:
    seen = []
    shard = WithPartner(0, [({1: "b", 3: "d"}, False)])
    scores, stopped = shard.score(iter("ABCDE"), lambda x: seen.append(x) or x.lower(), progress=False)
    assert seen == ["A", "C", "E"] and scores == ["a", "b", "c", "d", "e"] and not stopped


def test_a_rank_stopped_by_the_deadline_cuts_the_result_to_the_leading_items() -> None:
    # rank 1 scored item 1 only; rank 0 (no deadline here) scored 0, 2, 4: items 0-2 lead
    scores, stopped = WithPartner(0, [({1: 1}, True)]).score(range(6), lambda i: i, progress=False)
    assert scores == [0, 1, 2] and stopped


def test_the_first_items_are_scored_whatever_the_time() -> None:
    seen = []
    shard = WithPartner(1, [({0: 0, 2: 2}, True)])
    scores, stopped = shard.score(range(8), lambda i: seen.append(i) or i, deadline=PAST, always=4, progress=False)
    assert seen == [1, 3] and scores == [0, 1, 2, 3] and stopped  # a whole first condition of 4 trials


def test_ranks_agree_the_time_is_up_when_any_rank_says_so() -> None:
    assert WithPartner(0, [True]).time_is_up(None)  # only the other rank's clock is past
    assert WithPartner(1, [False]).time_is_up(PAST)
    assert not WithPartner(0, [False]).time_is_up(None)
    assert Shard().time_is_up(PAST) and not Shard().time_is_up(None)


@pytest.mark.parametrize("visible, expected", [(8, "cuda:1"), (1, "cuda:0")])
def test_an_eval_rank_takes_its_own_gpu(monkeypatch, visible, expected):
    """Rank 1 of 2 takes GPU 1 of the node's 8, or the one GPU it sees with --gpus-per-task=1."""
    import torch

    from evals.sharding import rank_device

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda") == expected and made_current == [expected]
    assert rank_device("cpu") == "cpu"
