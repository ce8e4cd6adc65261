"""Text to the token sequences a checkpoint saw in training, for every text eval.

Two rules come from training. A document starts with BOS only when the training data put
one there (``linrnn-prepare --add-bos``, recorded in the export as ``add_bos``); otherwise
its first token is read with an empty state and never predicted, so it is context only.
And text is tokenized whole: an answer is the tail of the tokenization of prompt plus
answer, not the answer tokenized alone, which would start with a word-start piece ("▁")
the model never sees at that seam (sentencepiece marks the start of every string it
encodes), so a model that predicts the text perfectly would still miss it.
"""
from __future__ import annotations

from dataclasses import dataclass

from data.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptCoder:
    tok: Tokenizer
    bos: bool  # the training documents started with BOS

    @property
    def start(self) -> list[int]:
        return [self.tok.bos_id] if self.bos else []

    @property
    def anchor(self) -> int:
        """The token to predict a document's first token from: BOS where training put one,
        else EOS, which ends the document before each one in the packed training data (BOS
        would be an embedding training never used, and some tokenizers have none)."""
        if self.bos or self.tok.eos_id < 0:
            return self.tok.bos_id
        return self.tok.eos_id

    def document(self, text: str) -> list[int]:
        """``text`` as the start of a document; the :attr:`anchor` alone when the text gives
        no token: something must be there to predict from."""
        ids = self.start + self.tok.encode(text)
        return ids or [self.anchor]

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prompt, answer) tokens of ``context + continuation`` tokenized whole, the prompt a
        document start. Trailing context whitespace moves to the answer (it belongs to the
        answer's first word); where a token spans the seam, it goes to the answer. The prompt
        is never empty (``document``'s rule: the anchor)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        shared = 0
        while shared < min(len(ctx), len(whole)) and ctx[shared] == whole[shared]:
            shared += 1
        prompt = self.start + whole[:shared]
        if not prompt:
            return [self.anchor], whole
        return prompt, whole[shared:]
