"""In-context evals of a pretrained LM with its own tokenizer: passkey retrieval over
lengths and depths, key-value lookup with natural words, few-shot parity and modular
arithmetic.

Retrieval is scored by greedy exactness under teacher forcing (every target token is the
argmax given the prompt and the target's previous tokens), which is what greedy decoding
would produce, at the cost of one forward pass. Few-shot tasks are multiple choice: the
answer with the highest log-likelihood wins. Prompts and answers are tokenized together and
start as the training documents did (``evals.prompts``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from data.tokenizer import Tokenizer

from .prompts import PromptCoder
from .sharding import Shard
from .tasks import Condition, ModularArithmeticTask, ParityTask

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Used when the tokenizer has too few whole-word pieces (small demo vocabularies): the
# words then span several tokens, and greedy exactness covers all of them.
COMMON_WORDS = tuple("""apple river stone light water table music garden window yellow forest silver market
winter summer bridge castle dragon island rocket planet orange purple mountain pencil doctor
engine candle mirror basket ladder thunder pillow butter jacket camera wallet spider rabbit
turtle falcon tiger zebra violin guitar piano trumpet copper marble velvet cotton ribbon anchor
harbor valley meadow desert canyon glacier lantern compass saddle barrel kettle hammer shovel
blanket helmet carpet curtain cabinet bottle teapot button needle feather""".split())
PASSKEY_INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"


@torch.no_grad()
def score_target(model: torch.nn.Module, prompt: list[int], target: list[int]) -> tuple[float, bool]:
    """Log-likelihood of ``target`` after ``prompt``, and whether greedy decoding yields it."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + target], device=device)
    logits = model(ids[:, :-1])[0, len(prompt) - 1:]
    tgt = ids[0, len(prompt):]
    logp = F.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(1, tgt[:, None]).sum()), bool((logits.argmax(-1) == tgt).all())


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float | None]]  # [depth][length]; None: not reached before the time limit
    trials: int
    stopped_by_time_limit: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_floor(tok: Tokenizer, bos: bool = False) -> int:
    """The shortest passkey length this tokenizer allows: the prompt without filler."""
    return len(passkey_prompt(tok, 1 << 30, 0.0, "99999", bos, filler=False)[0])


def passkey_prompt(tok: Tokenizer, length: int, depth: float, key: str,
                   bos: bool = False, filler: bool = True) -> tuple[list[int], list[int]]:
    """(prompt, answer) tokens: a prompt of at most ``length`` tokens, filled sentence by
    sentence, with the key at relative ``depth`` of the filler; the answer is " KEY"."""
    coder = PromptCoder(tok, bos)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    sentences = [x.strip() + ". " for x in FILLER.split(". ") if x.strip()]

    def prompt(count: int) -> tuple[list[int], list[int]]:
        filler = [sentences[i % len(sentences)] for i in range(count)]
        before = round(depth * count)
        text = PASSKEY_INTRO + "".join(filler[:before]) + needle + "".join(filler[before:]) + question
        return coder.split(text, " " + key)

    def fits(count: int) -> bool:
        return len(prompt(count)[0]) <= length

    if not filler:
        return prompt(0)
    # the most sentences that fit, measured on the joined text (a sentence tokenized alone
    # costs more: its trailing space is a piece of its own): a guess from one cycle's cost,
    # then galloping and bisection, a few tokenizations of the whole prompt
    base = len(prompt(0)[0])
    if base > length:
        raise ValueError(f"a passkey prompt of {length} tokens cannot hold the needle and the question "
                         f"({base} tokens with this tokenizer): use longer passkey lengths")
    per_sentence = (len(prompt(len(sentences))[0]) - base) / len(sentences)
    low = max(0, int((length - base) / max(per_sentence, 1e-9)))
    while low > 0 and not fits(low):
        low //= 2
    step = 1
    while fits(low + step):
        low, step = low + step, step * 2
    high = low + step  # low fits, high does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return prompt(low)



def passkey(model: torch.nn.Module, tok: Tokenizer, lengths: list[int], depths: list[float], trials: int = 5,
            seed: int = 0, progress: bool = True, deadline: float | None = None,
            shard: Shard = Shard(), bos: bool = False) -> PasskeyResult:
    """Accuracy per (depth, length), shortest lengths first, so a ``deadline`` that stops
    the loop (after the first cell) leaves whole columns of the short lengths."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cells = [(j, i) for j in order for i in range(len(depths))]
    prompts = [(lengths[j], depths[i], str(int(torch.randint(10_000, 100_000, (1,), generator=gen))))
               for j, i in cells for _ in range(trials)]
    hits, stopped = shard.score(prompts, lambda p: score_target(model, *passkey_prompt(tok, *p, bos=bos))[1],
                                deadline=deadline, always=trials, desc="passkey", progress=progress)
    acc: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
    for n, (j, i) in enumerate(cells):
        acc[i][j] = _mean(hits[n * trials:(n + 1) * trials], trials)
    return PasskeyResult(lengths, depths, acc, trials, stopped)


def _mean(hits: list[bool], trials: int) -> float | None:
    """A condition's accuracy, ``None`` unless all its trials were scored."""
    return sum(hits) / trials if len(hits) == trials else None


def word_pieces(tok: Tokenizer, min_len: int = 3, limit: int = 2000) -> list[str]:
    """Whole-word vocabulary pieces ("▁house" -> "house"): natural tokens for keys and values."""
    words = []
    for i in range(tok.vocab_size):
        piece = tok.sp.id_to_piece(i)
        if piece.startswith("\u2581") and piece[1:].isalpha() and len(piece) > min_len and piece[1:].islower():
            words.append(piece[1:])
            if len(words) >= limit:
                break
    return words


def kv_lookup(model: torch.nn.Module, tok: Tokenizer, pair_counts: list[int], trials: int = 20, seed: int = 0,
              progress: bool = True, deadline: float | None = None, shard: Shard = Shard(),
              bos: bool = False) -> dict:
    """``key: value`` lines of random words, then one key again; accuracy by number of pairs
    (``None`` past ``deadline``, checked after the first count). Words are the tokenizer's
    whole-word pieces (one token each) when it has enough."""
    model.eval()
    words = word_pieces(tok)
    if len(words) < 2 * max(pair_counts):
        words = list(COMMON_WORDS)
    if len(words) < 2 * max(pair_counts):
        raise ValueError(f"kv_lookup: at most {len(words) // 2} pairs of distinct words, "
                         f"asked for {max(pair_counts)}")
    gen = torch.Generator().manual_seed(seed)
    coder = PromptCoder(tok, bos)
    prompts = []
    for n in pair_counts:
        for _ in range(trials):
            pick = torch.randperm(len(words), generator=gen)[: 2 * n].tolist()
            keys, values = [words[i] for i in pick[:n]], [words[i] for i in pick[n:]]
            q = int(torch.randint(n, (1,), generator=gen))
            text = "Remember these pairs.\n" + "".join(f"{k}: {v}\n" for k, v in zip(keys, values)) + f"{keys[q]}:"
            prompts.append(coder.split(text, " " + values[q]))
    hits, stopped = shard.score(prompts, lambda p: score_target(model, *p)[1], deadline=deadline, always=trials,
                                desc="kv lookup", progress=progress)
    acc = [_mean(hits[c * trials:(c + 1) * trials], trials) for c in range(len(pair_counts))]
    return {"pairs": pair_counts, "accuracy": acc, "trials": trials,
            "chance": [1 / n for n in pair_counts], "stopped_by_time_limit": stopped}


def _choose(model: torch.nn.Module, options: list[tuple[list[int], list[int]]]) -> int:
    """The (prompt, answer) option with the highest answer log-likelihood."""
    scores = [score_target(model, prompt, answer)[0] for prompt, answer in options]
    return max(range(len(options)), key=scores.__getitem__)


def fewshot(model: torch.nn.Module, tok: Tokenizer, task: str, lengths: list[int], shots: int = 8,
            trials: int = 20, seed: int = 0, progress: bool = True, deadline: float | None = None,
            shard: Shard = Shard(), bos: bool = False) -> dict:
    """Few-shot ``parity`` ("1 0 1 -> 0") or ``modular_arithmetic`` ("3+4*2 = 1", mod 5);
    accuracy by length (``None`` past ``deadline``, checked after the first length)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    if task == "parity":
        src, n_choices = ParityTask(scoring="last"), 2

        def render(ids: list[int]) -> str:
            return " ".join(map(str, ids)) + " ->"
    elif task == "modular_arithmetic":
        src, n_choices = ModularArithmeticTask(modulus=5), 5

        def render(ids: list[int]) -> str:
            return src.render(ids[:-1]) + " ="
    else:
        raise ValueError(f"fewshot task must be 'parity' or 'modular_arithmetic', got {task!r}")
    coder = PromptCoder(tok, bos)
    prompts = []
    for L in lengths:
        for _ in range(trials):
            ids, labels = src.sample(shots + 1, Condition(L), gen)
            answers = labels[:, -1].tolist()
            lines = [f"{render(r)} {a}\n" for r, a in zip(ids[:-1].tolist(), answers[:-1])]
            prompts.append(("".join(lines) + render(ids[-1].tolist()), answers[-1]))

    def right(item: tuple[str, int]) -> bool:
        text, answer = item
        return _choose(model, [coder.split(text, f" {c}") for c in range(n_choices)]) == answer

    hits, stopped = shard.score(prompts, right, deadline=deadline, always=trials, desc=f"few-shot {task}",
                                progress=progress)
    acc = [_mean(hits[c * trials:(c + 1) * trials], trials) for c in range(len(lengths))]
    return {"task": task, "lengths": lengths, "accuracy": acc, "shots": shots,
            "trials": trials, "chance": 1 / n_choices, "stopped_by_time_limit": stopped}
