"""Modular arithmetic, without and with brackets (Deletang et al. 2023; Grazzi et al. 2025).

The input is an expression over the digits ``0..p-1`` and ``+ - *`` (optionally with
brackets), evaluated mod p with the usual precedence (``*`` before ``+``/``-``, left to
right), followed by ``=``; only the ``=`` position is labelled, with the result's digit.
Expressions have odd length (operands and operators alternate; brackets add two tokens),
so a condition of length L gives the largest odd expression length <= L, plus one token
for ``=``.
"""
from __future__ import annotations

import torch

from .base import IGNORE, Condition


class ModularArithmeticTask:
    prefix_scored = False

    def __init__(self, modulus: int = 5, brackets: bool = False):
        if modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {modulus}")
        self.p = modulus
        self.brackets = brackets
        self.name = "modular_arithmetic_brackets" if brackets else "modular_arithmetic"
        self.PLUS, self.MINUS, self.TIMES = modulus, modulus + 1, modulus + 2
        self.LPAR, self.RPAR, self.EQ = modulus + 3, modulus + 4, modulus + 5
        self.vocab_size = modulus + 6

    @staticmethod
    def expr_length(length: int) -> int:
        if length < 1:
            raise ValueError(f"expression length must be >= 1, got {length}")
        return length if length % 2 else length - 1

    def sample(self, n: int, cond: Condition, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.expr_length(cond.length)
        if self.brackets:
            rows = [self._bracketed(L, gen) for _ in range(n)]
            expr = torch.tensor(rows, dtype=torch.long).view(n, L)
            values = torch.tensor([self.evaluate(r) for r in rows], dtype=torch.long)
        else:
            k = (L + 1) // 2
            nums = torch.randint(0, self.p, (n, k), generator=gen)
            ops = torch.randint(0, 3, (n, k - 1), generator=gen) + self.PLUS
            expr = torch.empty(n, L, dtype=torch.long)
            expr[:, 0::2], expr[:, 1::2] = nums, ops
            values = self._evaluate_flat(nums, ops)
        ids = torch.cat([expr, torch.full((n, 1), self.EQ)], dim=1)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -1] = values
        return ids, labels

    def _evaluate_flat(self, nums: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """Vectorised precedence evaluation: a running sum of finished terms and the open term."""
        p = self.p
        total = torch.zeros_like(nums[:, 0])
        sign = torch.ones_like(total)
        term = nums[:, 0].clone()
        for j in range(ops.shape[1]):
            op, nxt = ops[:, j], nums[:, j + 1]
            times = op == self.TIMES
            closed = (total + sign * term) % p
            total = torch.where(times, total, closed)
            sign = torch.where(times, sign, torch.where(op == self.PLUS, 1, -1))
            term = torch.where(times, (term * nxt) % p, nxt)
        return (total + sign * term) % p

    def _bracketed(self, L: int, gen: torch.Generator) -> list[int]:
        """A random expression of exactly L (odd) tokens, built without recursion."""
        out: list[int] = []
        stack: list[tuple[bool, int]] = [(True, L)]  # (is_expression, length or token)
        while stack:
            is_expr, v = stack.pop()
            if not is_expr:
                out.append(v)
            elif v == 1:
                out.append(int(torch.randint(0, self.p, (1,), generator=gen)))
            elif float(torch.rand((), generator=gen)) < 0.5:
                stack += [(False, self.RPAR), (True, v - 2), (False, self.LPAR)]
            else:
                left = 2 * int(torch.randint(0, (v - 1) // 2, (1,), generator=gen)) + 1
                op = self.PLUS + int(torch.randint(0, 3, (1,), generator=gen))
                stack += [(True, v - 1 - left), (False, op), (True, left)]
        return out

    def evaluate(self, tokens: list[int]) -> int:
        """Shunting-yard evaluation mod p (iterative: deep brackets cannot overflow the stack)."""
        p, prec = self.p, {self.PLUS: 1, self.MINUS: 1, self.TIMES: 2}
        vals: list[int] = []
        ops: list[int] = []

        def apply() -> None:
            op, b, a = ops.pop(), vals.pop(), vals.pop()
            vals.append((a + b) % p if op == self.PLUS else (a - b) % p if op == self.MINUS else (a * b) % p)

        for t in tokens:
            if t < p:
                vals.append(t)
            elif t == self.LPAR:
                ops.append(t)
            elif t == self.RPAR:
                while ops[-1] != self.LPAR:
                    apply()
                ops.pop()
            elif t in prec:
                while ops and ops[-1] in prec and prec[ops[-1]] >= prec[t]:
                    apply()
                ops.append(t)
            else:
                raise ValueError(f"token {t} is not part of an expression")
        while ops:
            apply()
        if len(vals) != 1:
            raise ValueError("malformed expression")
        return vals[0]

    def render(self, tokens: list[int]) -> str:
        """Human-readable form, for tests and reports."""
        sym = {self.PLUS: "+", self.MINUS: "-", self.TIMES: "*", self.LPAR: "(", self.RPAR: ")", self.EQ: "="}
        return "".join(str(t) if t < self.p else sym[t] for t in tokens)
