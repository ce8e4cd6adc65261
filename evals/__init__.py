"""Evaluation: synthetic architecture benchmarks, checkpoint evaluation and reports.

Architecture benchmarks (train from scratch): ``evals.tasks`` generates the data,
``evals.train`` trains, ``evals.metrics`` scores by length, ``evals.suites`` holds the
published settings, ``evals.bench`` runs models x seeds x learning rates.
Checkpoint evaluation (exported models): ``evals.checkpoint`` loads an export, ``evals.lm``
(perplexity, bits per byte, length extrapolation), ``evals.incontext`` (passkey, key-value
lookup, few-shot state tracking), ``evals.checkpoint_eval`` runs them;
``evals.lm_eval_adapter`` plugs an export into lm-evaluation-harness (optional).
``evals.report`` writes JSON / Markdown / PNG, and ``evals.cli`` is ``linrnn-eval``.
"""
