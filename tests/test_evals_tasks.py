"""Synthetic task generators: answers checked independently, labels only where scored,
lengths as asked, and every batch reproducible from its generator's seed."""
from __future__ import annotations

import itertools

import pytest
import torch

from evals.tasks import (IGNORE, Condition, GroupWordTask, ModularArithmeticTask, MQARTask, ParityTask,
                         group_table, make_task, uniform_length)


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["parity", "modular_arithmetic", "modular_arithmetic_brackets", "s3", "a5", "mqar"])
def test_same_seed_same_batch_other_seed_other_batch(name: str) -> None:
    task = make_task(name, vocab_size=64) if name == "mqar" else make_task(name)
    cond = Condition(32, 4) if name == "mqar" else Condition(21)
    a = task.sample(16, cond, gen(3))
    b = task.sample(16, cond, gen(3))
    c = task.sample(16, cond, gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.long and a[0].shape == a[1].shape
    assert int(a[0].min()) >= 0 and int(a[0].max()) < task.vocab_size
    scored = a[1][a[1] != IGNORE]
    assert int(scored.min()) >= 0 and int(scored.max()) < task.vocab_size


def test_parity_labels_are_running_parity() -> None:
    x, y = ParityTask().sample(8, Condition(17), gen())
    for row, lab in zip(x.tolist(), y.tolist()):
        assert lab == [sum(row[: t + 1]) % 2 for t in range(len(row))]
    x, y = ParityTask(scoring="last").sample(8, Condition(9), gen())
    assert (y[:, :-1] == IGNORE).all()
    assert y[:, -1].tolist() == [sum(r) % 2 for r in x.tolist()]
    with pytest.raises(ValueError, match="scoring"):
        ParityTask(scoring="middle")
    # the task names: "parity" scores the final answer (Grazzi et al.), "parity_tagged" every prefix
    assert (make_task("parity").scoring, make_task("parity_tagged").scoring) == ("last", "every")
    assert (make_task("parity").name, make_task("parity_tagged").name) == ("parity", "parity_tagged")


def _perms(n: int, even: bool) -> list[tuple[int, ...]]:
    ps = list(itertools.permutations(range(n)))
    sign = lambda p: sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n)) % 2  # noqa: E731
    return [p for p in ps if not even or sign(p) == 0]


@pytest.mark.parametrize("name,n,even", [("s3", 3, False), ("a5", 5, True), ("s4", 4, False)])
def test_group_running_product_matches_permutation_matrices(name: str, n: int, even: bool) -> None:
    """Recompute every label with permutation matrices: P(a then b) = P(a) @ P(b)."""
    elements = _perms(n, even)
    mats = torch.stack([torch.eye(n)[list(p)] for p in elements])  # row i is e_{p[i]}
    task = GroupWordTask(name)
    x, y = task.sample(6, Condition(25), gen(1))
    assert (y != IGNORE).all()  # every position labelled
    for row, lab in zip(x.tolist(), y.tolist()):
        acc = torch.eye(n)
        for t, e in enumerate(row):
            acc = acc @ mats[e]
            assert torch.equal(mats[lab[t]], acc)


@pytest.mark.parametrize("name,order,abelian", [("s3", 6, False), ("s4", 24, False), ("a5", 60, False),
                                                ("s5", 120, False), ("z60", 60, True)])
def test_group_tables_are_groups(name: str, order: int, abelian: bool) -> None:
    t = group_table(name)
    assert t.shape == (order, order)
    r = torch.arange(order)
    assert torch.equal(t[0], r) and torch.equal(t[:, 0], r)  # 0 is the identity
    assert all(torch.equal(row.sort().values, r) for row in t)  # Latin square: inverses exist
    a, b, c = torch.randint(0, order, (3, 500), generator=gen())
    assert torch.equal(t[t[a, b], c], t[a, t[b, c]])  # associative
    assert torch.equal(t, t.T) == abelian
    assert make_task(name).vocab_size == order


def test_z60_is_a_running_sum() -> None:
    x, y = make_task("z60").sample(4, Condition(30), gen())
    assert torch.equal(y, torch.cumsum(x, 1) % 60)


def _python_value(task: ModularArithmeticTask, ids: list[int]) -> int:
    return eval(task.render(ids[:-1])) % task.p  # noqa: S307 (digits, + - * and brackets only)


@pytest.mark.parametrize("brackets", [False, True])
@pytest.mark.parametrize("length", [1, 2, 7, 16, 31])
def test_modular_arithmetic_answers_and_lengths(brackets: bool, length: int) -> None:
    task = ModularArithmeticTask(modulus=5, brackets=brackets)
    ids, labels = task.sample(40, Condition(length), gen(length))
    expr_len = length if length % 2 else length - 1
    assert ids.shape == (40, expr_len + 1)
    assert (ids[:, -1] == task.EQ).all()
    assert (labels[:, :-1] == IGNORE).all()  # only the answer is scored
    for row, lab in zip(ids.tolist(), labels[:, -1].tolist()):
        assert lab == _python_value(task, row), task.render(row)
        assert task.evaluate(row[:-1]) == lab
    has_brackets = bool(((ids == task.LPAR) | (ids == task.RPAR)).any())
    assert has_brackets == (brackets and expr_len >= 3)


def test_bracket_expressions_are_balanced_and_deep_ones_evaluate() -> None:
    task = ModularArithmeticTask(brackets=True)
    ids, labels = task.sample(5, Condition(601), gen())
    for row in ids.tolist():
        depth = 0
        for t in row:
            depth += (t == task.LPAR) - (t == task.RPAR)
            assert depth >= 0
        assert depth == 0
    assert task.evaluate([task.LPAR] * 300 + [3] + [task.RPAR] * 300) == 3  # no recursion limit
    assert task.evaluate([2, task.PLUS, 3, task.TIMES, 4]) == (2 + 12) % 5
    assert task.evaluate([2, task.MINUS, 3, task.MINUS, 4]) == (2 - 3 - 4) % 5


def test_mqar_layout_matches_zoology() -> None:
    V, T, P = 128, 64, 8
    task = MQARTask(vocab_size=V)
    ids, labels = task.sample(32, Condition(T, P), gen(5))
    assert ids.shape == labels.shape == (32, T)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:2 * P:2], row[1:2 * P:2]
        assert all(1 <= k < V // 2 for k in keys) and len(set(keys)) == P
        assert all(V // 2 <= v < V for v in values) and len(set(values)) == P
        answer = dict(zip(keys, values))
        scored = [t for t in range(T) if lab[t] != IGNORE]
        assert len(scored) == P and min(scored) >= 2 * P  # each key queried once, after the pairs
        assert sorted(row[t] for t in scored) == sorted(keys)
        assert all(lab[t] == answer[row[t]] for t in scored)
        assert all((t - 2 * P) % 2 == 0 for t in scored)


def test_mqar_gaps_favour_short_distances_and_bad_conditions_fail() -> None:
    task = MQARTask(vocab_size=256)
    _, labels = task.sample(400, Condition(256, 4), gen())
    pos = (labels != IGNORE).nonzero()[:, 1] - 8
    assert float((pos < 62).float().mean()) > 0.4  # power law: much more than uniform's 0.25
    for cond in (Condition(64, 0), Condition(63, 4), Condition(64, 17)):
        with pytest.raises(ValueError, match="MQAR"):
            task.sample(2, cond, gen())
    with pytest.raises(ValueError, match="vocab"):
        MQARTask(vocab_size=4)


def test_unknown_task_names_the_closest_and_lengths_stay_in_range() -> None:
    with pytest.raises(ValueError, match="did you mean 'parity'"):
        make_task("parrity")
    with pytest.raises(ValueError, match="unknown group"):
        group_table("Q8")
    g = gen()
    draws = {uniform_length(3, 7, g) for _ in range(200)}
    assert draws == {3, 4, 5, 6, 7}
    with pytest.raises(ValueError):
        uniform_length(5, 4, g)
