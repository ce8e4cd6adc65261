"""Scoring: cumulative sequence accuracy, per-length evaluation and the longest solved
length, checked with hand-made masks and with oracle models that err where we choose."""
from __future__ import annotations

import pytest
import torch

from evals.metrics import (LengthScore, cumulative_sequence_accuracy, evaluate_task, longest_solved,
                           token_accuracy)
from evals.tasks import Condition, make_task


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


class ParityOracle(torch.nn.Module):
    """Predicts running parity exactly, except (optionally) at one position from ``err_from`` on
    in rows whose first bit is 1: so half the sequences fail from that length on."""

    def __init__(self, err_from: int | None = None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.err_from = err_from

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pred = torch.cumsum(ids, 1) % 2
        if self.err_from is not None and ids.shape[1] > self.err_from:
            flip = ids[:, 0] == 1
            pred[flip, self.err_from] = 1 - pred[flip, self.err_from]
        return torch.nn.functional.one_hot(pred, 2).float()


def test_cumulative_sequence_accuracy_by_hand() -> None:
    correct = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert cumulative_sequence_accuracy(correct).tolist() == pytest.approx([1.0, 2 / 3, 2 / 3, 1 / 3])
    labels = torch.tensor([[0, -100, 1, 1]])
    assert token_accuracy(torch.tensor([[True, False, False, True]]), labels) == pytest.approx(2 / 3)


def test_longest_solved_stops_at_the_first_failure() -> None:
    pts = [LengthScore(L, 0, 1.0, acc) for L, acc in [(10, 1.0), (20, 0.995), (40, 0.9), (80, 1.0)]]
    assert longest_solved(pts, 0.99) == 20
    assert longest_solved(pts, 0.8) == 80
    assert longest_solved([LengthScore(10, 0, 0.5, 0.5)], 0.99) == 0
    # MQAR: a length counts only when all its pair counts pass (512x64 passes, 512x128 fails)
    mqar = [LengthScore(256, 16, 1.0, 1.0), LengthScore(512, 64, 1.0, 1.0), LengthScore(512, 128, 0.9, 0.5)]
    assert longest_solved(mqar, 0.99) == 256


def test_prefix_scored_evaluation_finds_where_sequences_break() -> None:
    task = make_task("parity_tagged")
    conds = [Condition(L) for L in (4, 8, 16, 32)]
    perfect = evaluate_task(ParityOracle(), task, conds, 200, torch.Generator().manual_seed(0))
    assert [p.seq_acc for p in perfect.points] == [1.0] * 4 and len(perfect.curve) == 32
    broken = evaluate_task(ParityOracle(err_from=10), task, conds, 400, torch.Generator().manual_seed(0))
    assert [p.seq_acc for p in broken.points[:2]] == [1.0, 1.0]
    assert broken.points[2].seq_acc == pytest.approx(0.5, abs=0.08)
    assert broken.curve[9] == 1.0 and broken.curve[10] < 0.6
    assert longest_solved(broken.points) == 8


def test_answer_only_tasks_are_scored_per_condition() -> None:
    """A model that always answers 0 is right exactly when the result is 0 (about 1/5)."""
    task = make_task("modular_arithmetic")

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            out = torch.zeros(*ids.shape, task.vocab_size)
            out[..., 0] = 1.0
            return out

    res = evaluate_task(Zero(), task, [Condition(5), Condition(15)], 500, torch.Generator().manual_seed(1))
    for p in res.points:
        assert p.token_acc == p.seq_acc  # one scored answer per sequence
        assert 0.12 < p.token_acc < 0.28
    assert res.curve == []
