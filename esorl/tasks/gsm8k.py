"""GSM8K: grade-school maths word problems; answers judged with math-verify."""

from __future__ import annotations

import re


def gold_answer(solution: str) -> str:
    """The number after the last ``####`` of a GSM8K solution."""
    tail = solution.rsplit("####", 1)[-1]
    return tail.strip().replace(",", "")


def score(completion: str, gold: str) -> float:
    """1.0 if math-verify finds the completion's final answer equal to ``gold``, else 0.0. A
    completion with ``####`` is judged on what follows its last ``####``."""
    from math_verify import parse, verify

    text = completion or ""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    if not text.strip():
        return 0.0
    try:
        return 1.0 if verify(parse(gold), parse(text)) else 0.0
    except Exception:  # noqa: BLE001 - unparsable text is a wrong answer
        return 0.0


FORMAT = re.compile(r"####\s*-?[0-9][0-9,]*(\.[0-9]+)?")
