"""Rule-based reward functions in TRL's callable convention.

Every reward here is called as ``f(prompts, completions, **columns) -> list[float | None]``:
``prompts`` and ``completions`` are equally long lists, extra dataset columns
arrive as keyword lists (``answer=[...]``), and anything else TRL passes
(``completion_ids``, ``trainer_state``, ``log_metric`` ...) is accepted and ignored.
Each callable has a ``__name__`` (TRL logs ``rewards/<__name__>/mean``).

Completions may be plain strings or, for conversational datasets, lists of
``{"role", "content"}`` messages; the text scored is then the concatenated
``content`` of the messages.

The factories (:func:`length_reward`, :func:`keyword_reward`, :func:`format_reward`)
return instances of small classes rather than closures so that the reward
functions can be pickled (multi-process data loading, ``accelerate``).
All functions are pure and cost O(total characters).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any, Iterable, Literal, Sequence

__all__ = [
    "completion_text",
    "extract_gsm8k_answer",
    "gsm8k_answer_reward",
    "length_reward",
    "keyword_reward",
    "format_reward",
    "LengthReward",
    "KeywordReward",
    "FormatReward",
]


def completion_text(x: Any) -> str:
    """The text of a prompt or completion: a ``str`` as is; a message list → its contents joined."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        c = x.get("content", "")
        return c if isinstance(c, str) else completion_text(c)
    if isinstance(x, (list, tuple)):
        parts = []
        for m in x:
            if isinstance(m, dict) and m.get("type") not in (None, "text"):
                continue  # non-text content blocks (images ...)
            parts.append(completion_text(m.get("text", m.get("content", "")) if isinstance(m, dict) else m))
        return "".join(parts)
    if x is None:
        return ""
    raise TypeError(f"expected a string or a list of chat messages, got {type(x).__name__}")


def _check_lengths(name: str, prompts: Sequence, completions: Sequence, **cols: Sequence) -> None:
    n = len(completions)
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{name}: {len(prompts)} prompts but {n} completions")
    for k, v in cols.items():
        if len(v) != n:
            raise ValueError(f"{name}: column {k!r} has {len(v)} entries but there are {n} completions")


# --------------------------------------------------------------------------- GSM8K

# A number: optional sign (only when not glued to a preceding word/number, so
# "16-3" is 16 and 3, not 16 and -3), optional "$", then either comma-grouped
# digits ("1,234,567.5") or plain digits ("1234.5"). A trailing "." (end of
# sentence) is not part of the number because a decimal point needs a digit after it.
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212])?(?:\$\s?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"|(?<![\w.\-\u2212])\$(?P<sign2>[-\u2212])(?P<num2>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
)


def _canonical(sign: str | None, num: str) -> str | None:
    try:
        d = Decimal(num.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only matches valid numbers
        return None
    if sign:
        d = -d
    if d == 0:
        return "0"
    # normalize() rounds to the context's precision (28 digits by default): two different
    # long numbers would compare equal; give it every digit the number has
    with localcontext() as ctx:
        ctx.prec = max(28, len(num) + 2)
        return format(d.normalize(), "f")


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER_RE.finditer(text):
        if m.group("num") is not None:
            c = _canonical(m.group("sign"), m.group("num"))
        else:
            c = _canonical(m.group("sign2"), m.group("num2"))
        if c is not None:
            out.append(c)
    return out


def extract_gsm8k_answer(text: Any) -> str | None:
    """The final numeric answer of a GSM8K solution or a model completion, canonicalised.

    If ``text`` contains ``####``, the first number after the *last* ``####`` is
    the answer (``None`` if there is none there); otherwise the last number in
    the text. Commas, ``$`` and a trailing ``.`` are ignored and the number is
    canonicalised (``"$1,000.00"`` → ``"1000"``, ``"-3.50"`` → ``"-3.5"``), so
    two answers are equal exactly when the strings are equal. ``None`` if no number.
    """
    text = completion_text(text)
    if "####" in text:
        nums = _numbers(text.rsplit("####", 1)[1])
        return nums[0] if nums else None
    nums = _numbers(text)
    return nums[-1] if nums else None


def gsm8k_answer_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **kwargs: Any
) -> list[float | None]:
    """1.0 if the completion's final number equals the gold ``#### <number>`` of ``answer``, else 0.0.

    The completion's answer is the number after its last ``####`` if it has one,
    else its last number (see :func:`extract_gsm8k_answer`). ``answer`` is the
    GSM8K ``answer`` column (full solution ending in ``#### N``, or just ``N``).
    A sample whose gold answer has no number gets ``None`` (TRL: "not applicable").
    """
    _check_lengths("gsm8k_answer_reward", prompts, completions, answer=answer)
    out: list[float | None] = []
    for completion, gold_text in zip(completions, answer):
        gold = extract_gsm8k_answer(gold_text)
        if gold is None:
            out.append(None)
            continue
        out.append(1.0 if extract_gsm8k_answer(completion) == gold else 0.0)
    return out


# --------------------------------------------------------------------------- length


class LengthReward:
    """``-|n - target| / target`` where ``n`` is the completion length (see :func:`length_reward`)."""

    def __init__(
        self,
        target_words: int = 50,
        *,
        unit: Literal["words", "chars"] = "words",
        min_reward: float | None = None,
        name: str | None = None,
    ) -> None:
        if not (isinstance(target_words, int) and target_words > 0):
            raise ValueError(f"target_words must be a positive int, got {target_words!r}")
        if unit not in ("words", "chars"):
            raise ValueError(f"unit must be 'words' or 'chars', got {unit!r}")
        if min_reward is not None and not (math.isfinite(min_reward) and min_reward <= 0):
            raise ValueError(f"min_reward must be a finite number <= 0 or None, got {min_reward!r}")
        self.target = target_words
        self.unit = unit
        self.min_reward = min_reward
        self.__name__ = name or f"length_reward_{target_words}{'w' if unit == 'words' else 'c'}"

    def length(self, text: str) -> int:
        return len(text.split()) if self.unit == "words" else len(text)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        _check_lengths(self.__name__, prompts, completions)
        out = []
        for c in completions:
            r = -abs(self.length(completion_text(c)) - self.target) / self.target
            if self.min_reward is not None:
                r = max(r, self.min_reward)
            out.append(float(r))
        return out

    def __repr__(self) -> str:
        return f"LengthReward(target_words={self.target}, unit={self.unit!r}, min_reward={self.min_reward})"


def length_reward(
    target_words: int = 50,
    *,
    unit: Literal["words", "chars"] = "words",
    min_reward: float | None = None,
    name: str | None = None,
) -> LengthReward:
    """A reward for hitting a target length: ``-|n - target_words| / target_words``.

    ``n`` is the number of whitespace-separated words (``unit="words"``) or of
    characters (``unit="chars"``; ``target_words`` is then a character count).
    The reward is 0 at the target, -1 at 0 or 2×target; ``min_reward`` (e.g. -1)
    clips it from below so very long outputs do not dominate.
    """
    return LengthReward(target_words, unit=unit, min_reward=min_reward, name=name)


# --------------------------------------------------------------------------- keywords


def _keyword_regex(words: Iterable[str], case_sensitive: bool) -> re.Pattern | None:
    words = [w for w in words]
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"keywords must be non-empty strings, got {w!r}")
    if not words:
        return None
    # Longest first so that a phrase wins over its own first word; whole-word
    # boundaries that also work for keywords starting/ending in punctuation.
    alts = "|".join(re.escape(w.strip()) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", 0 if case_sensitive else re.IGNORECASE)


class KeywordReward:
    """Whole-word keyword counting reward (see :func:`keyword_reward`)."""

    def __init__(
        self,
        positive: Sequence[str],
        negative: Sequence[str] = (),
        *,
        normalize: Literal["hits", "words", "none"] = "hits",
        case_sensitive: bool = False,
        name: str | None = None,
    ) -> None:
        if isinstance(positive, str) or isinstance(negative, str):
            raise TypeError("positive and negative must be lists of strings, not a single string")
        if not positive and not negative:
            raise ValueError("keyword_reward needs at least one positive or negative keyword")
        if normalize not in ("hits", "words", "none"):
            raise ValueError(f"normalize must be 'hits', 'words' or 'none', got {normalize!r}")
        self.positive = list(positive)
        self.negative = list(negative)
        self.normalize = normalize
        self.case_sensitive = case_sensitive
        self._pos = _keyword_regex(self.positive, case_sensitive)
        self._neg = _keyword_regex(self.negative, case_sensitive)
        self.__name__ = name or "keyword_reward"

    def counts(self, text: str) -> tuple[int, int]:
        """(positive hits, negative hits) in ``text``, non-overlapping whole-word matches."""
        p = len(self._pos.findall(text)) if self._pos is not None else 0
        n = len(self._neg.findall(text)) if self._neg is not None else 0
        return p, n

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        _check_lengths(self.__name__, prompts, completions)
        out = []
        for c in completions:
            text = completion_text(c)
            p, n = self.counts(text)
            if self.normalize == "hits":
                r = (p - n) / (p + n) if p + n else 0.0
            elif self.normalize == "words":
                r = (p - n) / max(1, len(text.split()))
            else:
                r = float(p - n)
            out.append(float(r))
        return out

    def __repr__(self) -> str:
        return (
            f"KeywordReward(positive={self.positive!r}, negative={self.negative!r}, "
            f"normalize={self.normalize!r}, case_sensitive={self.case_sensitive})"
        )


def keyword_reward(
    positive: Sequence[str],
    negative: Sequence[str] = (),
    *,
    normalize: Literal["hits", "words", "none"] = "hits",
    case_sensitive: bool = False,
    name: str | None = None,
) -> KeywordReward:
    """A reward counting whole-word (or whole-phrase) keyword hits.

    With ``p`` positive and ``n`` negative hits (non-overlapping, case-insensitive
    unless ``case_sensitive``; "good" does not match "goodness"):

    - ``normalize="hits"`` (default): ``(p - n) / (p + n)`` in [-1, 1], 0 with no hits;
    - ``normalize="words"``: ``(p - n) / number_of_words`` (a density);
    - ``normalize="none"``: ``p - n``.
    """
    return KeywordReward(positive, negative, normalize=normalize, case_sensitive=case_sensitive, name=name)


# --------------------------------------------------------------------------- format


class FormatReward:
    """1.0 if the completion matches a regex, else 0.0 (see :func:`format_reward`)."""

    def __init__(
        self,
        pattern: str | re.Pattern,
        *,
        mode: Literal["full", "search", "start"] = "full",
        flags: int = re.DOTALL,
        strip: bool = True,
        name: str | None = None,
    ) -> None:
        if mode not in ("full", "search", "start"):
            raise ValueError(f"mode must be 'full', 'search' or 'start', got {mode!r}")
        self.regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
        self.mode = mode
        self.strip = strip
        self._match = {"full": self.regex.fullmatch, "search": self.regex.search, "start": self.regex.match}[mode]
        self.__name__ = name or "format_reward"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        _check_lengths(self.__name__, prompts, completions)
        out = []
        for c in completions:
            text = completion_text(c)
            if self.strip:
                text = text.strip()
            out.append(1.0 if self._match(text) else 0.0)
        return out

    # re.Pattern bound methods do not pickle; rebuild them.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_match", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._match = {"full": self.regex.fullmatch, "search": self.regex.search, "start": self.regex.match}[self.mode]

    def __repr__(self) -> str:
        return f"FormatReward(pattern={self.regex.pattern!r}, mode={self.mode!r})"


def format_reward(
    pattern: str | re.Pattern,
    *,
    mode: Literal["full", "search", "start"] = "full",
    flags: int = re.DOTALL,
    strip: bool = True,
    name: str | None = None,
) -> FormatReward:
    """A 1/0 reward for matching ``pattern``.

    ``mode="full"`` (default) requires the whole completion to match
    (``re.fullmatch``), ``"start"`` a match at the beginning (``re.match``),
    ``"search"`` a match anywhere (``re.search``). ``flags`` default to
    ``re.DOTALL`` so ``.`` spans lines; ``strip`` removes surrounding whitespace
    first. Example: ``format_reward(r"<think>.*?</think>\\s*<answer>.*?</answer>")``.
    """
    return FormatReward(pattern, mode=mode, flags=flags, strip=strip, name=name)
