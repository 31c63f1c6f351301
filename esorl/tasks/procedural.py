"""reasoning-gym tasks: countdown, 4×4 mini sudoku, basic arithmetic (and its small variant
``basic_arithmetic_1d``).

Questions come from the library's seeded generators and are judged by the library's own
``score_answer`` on its own record of the question (the ``entry`` column). The ``compact``
rendering and its answer format are esorl's, for models small enough to train on a CPU; a
compact answer is turned back into the library's format before it is scored.
"""

from __future__ import annotations

import ast
import json
import re

# reasoning-gym's configuration per task (kept small: 4x4 sudoku, 2-3 term arithmetic)
CONFIGS = {
    "countdown": {"min_numbers": 3, "max_numbers": 4, "min_target": 10, "max_target": 100, "min_value": 1, "max_value": 25},
    "mini_sudoku": {"min_empty": 4, "max_empty": 8},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, "operators": ("+", "-", "*")},
    # a smaller question space for CPU-sized models: two 1-digit terms (-9..9, with the
    # library's negations and brackets), + and - only: ~7600 distinct question texts, ~2600
    # canonical forms (the split's unit, see SPLIT_RULES), 37 answers (-18..18)
    "basic_arithmetic_1d": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ("+", "-")},
}
#: esorl's task variants → the reasoning-gym dataset they draw from and are scored by (a
#: variant is the library's task under other CONFIGS settings; it renders like its base)
VARIANTS = {"basic_arithmetic_1d": "basic_arithmetic"}


def library_name(name: str) -> str:
    """The reasoning-gym dataset behind an esorl task name (itself, or a variant's base)."""
    return VARIANTS.get(name, name)


def generate(name: str, size: int, seed: int) -> list[dict]:
    """``size`` records ``{question, answer, metadata}`` of the named task."""
    import reasoning_gym as rg

    ds = rg.create_dataset(library_name(name), size=size, seed=seed, **CONFIGS[name])
    return [{"question": e["question"], "answer": e["answer"], "metadata": e["metadata"]} for e in ds]


def compact_prompt(name: str, e: dict) -> str:
    name, m = library_name(name), e["metadata"]
    if name == "countdown":
        return f"{' '.join(map(str, m['numbers']))} -> {m['target']} ="
    if name == "mini_sudoku":
        return "sudoku " + " ".join("".join(str(v) if v else "0" for v in row) for row in m["puzzle"]) + " ="
    if name == "basic_arithmetic":
        return f"{m['expression']} ="
    raise KeyError(name)


#: how the train/test split tells two questions apart, per task (default ``text``: the compact
#: prompt). ``ast``: an arithmetic expression's canonical form (:func:`canonical_expression`),
#: so that a held-out ``( 2 + -8 )`` is not trained on as ``2 + -8``.
SPLIT_RULES = {"basic_arithmetic": "ast", "basic_arithmetic_1d": "ast"}


def split_rule(name: str) -> str:
    """``text`` or ``ast``: see :data:`SPLIT_RULES`."""
    return SPLIT_RULES.get(name, "text")


def canonical_expression(expr: str) -> str:
    """An arithmetic expression's canonical form: the dump of its Python AST, which drops
    redundant brackets (``( 2 + -8 )`` ≡ ``2 + -8``) but keeps what changes the expression
    (``-( 7 - -6 )`` ≢ ``-7 - -6``). Raises ``SyntaxError`` for text that is no expression."""
    return ast.dump(ast.parse(expr.strip(), mode="eval"))


def split_key(name: str, e: dict) -> str:
    """What the train/test split compares (:func:`esorl.tasks.load_task`): a training question
    whose key equals a held-out question's is dropped from the train split."""
    if split_rule(name) == "ast":
        return canonical_expression(e["metadata"]["expression"])
    return compact_prompt(name, e)


def compact_answer(name: str, e: dict) -> str:
    if library_name(name) == "mini_sudoku":
        return " ".join("".join(map(str, row)) for row in e["metadata"]["solution"])
    return str(e["answer"])


def to_library_answer(name: str, completion: str, rendering: str) -> str | None:
    """The part of a completion the library should judge, in the library's answer format
    (``None``: nothing to judge, e.g. an empty completion)."""
    text = (completion or "").strip()
    if not text:
        return None
    if rendering != "compact":
        return text
    if library_name(name) == "mini_sudoku":  # 16 digits, compact rows "2143 4312 ..." → the library's grid
        digits = "".join(re.findall(r"[1-4]", text))[:16]
        if len(digits) < 16:
            return None
        return "\n".join(" ".join(digits[i * 4 : i * 4 + 4]) for i in range(4))
    return text.splitlines()[0].strip()


def score(name: str, completion: str, entry_json: str, rendering: str) -> float:
    """1.0 if the library scores the completion as fully correct, else 0.0 (the library's
    partial credits, e.g. countdown's 0.01 for a well-formed wrong expression, count as 0)."""
    import reasoning_gym as rg

    entry = json.loads(entry_json)
    ans = to_library_answer(name, completion, rendering)
    if ans is None:
        return 0.0
    try:
        s = rg.get_score_answer_fn(library_name(name))(ans, entry)
    except Exception:  # noqa: BLE001 - a malformed completion is wrong, not an error
        return 0.0
    return 1.0 if s >= 1.0 else 0.0


FORMATS = {
    # the shape of a well-formed answer per rendering (a format reward, where the task has one)
    ("countdown", "compact"): r"^\s*[0-9+\-*/() ]+\s*$",
    ("countdown", "natural"): r"[0-9]+\s*[+\-*/]\s*[0-9]+",
    ("mini_sudoku", "compact"): r"^\s*[1-4]{4}( [1-4]{4}){3}\s*$",
    ("mini_sudoku", "natural"): r"([1-4] [1-4] [1-4] [1-4]\s*\n?){4}",
    ("basic_arithmetic", "compact"): r"^\s*-?[0-9]+\s*$",
    ("basic_arithmetic", "natural"): r"-?[0-9]+",
}
FORMATS.update({(v, r): FORMATS[(base, r)] for v, base in VARIANTS.items() for r in ("compact", "natural")})
