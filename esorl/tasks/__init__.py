"""Verifiable reasoning tasks: each a ``datasets.Dataset`` of prompts with checkable answers,
and reward functions in TRL's contract ``f(prompts, completions, **columns) -> list[float]``.

* ``countdown``, ``mini_sudoku`` (4×4), ``basic_arithmetic``: procedural, seeded generators
  and scorers of `reasoning-gym` (:mod:`esorl.tasks.procedural`); train and test splits are
  drawn with different seeds and never share a question (for arithmetic: never the same
  expression up to redundant brackets, :func:`esorl.tasks.procedural.split_key`).
* ``gsm8k``: a local JSONL copy (``question``/``answer``) or the hub's ``openai/gsm8k``,
  answers checked with `math-verify` (:mod:`esorl.tasks.gsm8k`).

Every row has ``prompt`` (in one of two renderings: ``natural``, the library's question, for
real models; ``compact``, a terse form small models can learn on a CPU), ``answer`` (the
reference, in the rendering's answer format) and ``entry`` (the library's own record, JSON,
so the library's scorer can judge a completion). Rewards read those columns.
"""

from __future__ import annotations

from .passk import pass_at_k
from .registry import TASKS, RENDERINGS, load_task, task_rewards

__all__ = ["TASKS", "RENDERINGS", "load_task", "pass_at_k", "task_rewards"]
