"""Combining reward functions and calling them safely.

- :func:`call_reward` calls one reward function and turns every failure into a
  :class:`RewardFunctionError` that names the function and, where possible,
  the first failing sample (index, prompt, completion); it also validates the
  output (a list of one float-or-None per completion, no NaN/inf).
- :func:`weighted_sum` combines several reward functions into one callable.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Literal, Sequence

__all__ = ["RewardFunctionError", "reward_name", "call_reward", "weighted_sum", "WeightedSum"]

RewardFunc = Callable[..., Sequence["float | None"]]

_SNIPPET = 200


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not one finite float/None per sample.

    Attributes: ``func_name``; ``index`` (the failing sample, or ``None`` if no
    single sample could be blamed); ``prompt`` and ``completion`` of that sample.
    """

    def __init__(
        self,
        message: str,
        func_name: str,
        index: int | None = None,
        prompt: Any = None,
        completion: Any = None,
    ) -> None:
        super().__init__(message)
        self.func_name = func_name
        self.index = index
        self.prompt = prompt
        self.completion = completion


def reward_name(func: Any) -> str:
    """The display name of a reward callable (same rule as TRL: ``__name__``, else the class name)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _snippet(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= _SNIPPET else r[: _SNIPPET - 3] + "..."


def _slice_columns(columns: dict[str, Any], n: int, i: int) -> dict[str, Any]:
    """Per-sample view of the keyword columns: lists/tuples of length ``n`` are sliced, the rest passed through."""
    out = {}
    for k, v in columns.items():
        if isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


def _as_float(name: str, i: int, r: Any, prompt: Any, completion: Any) -> float | None:
    if r is None:
        return None
    if isinstance(r, numbers.Real) and not isinstance(r, bool):
        v = float(r)
    elif hasattr(r, "item") and tuple(getattr(r, "shape", (None,))) == ():
        # 0-d numpy arrays / numpy scalars / 0-d torch tensors
        v = r.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardFunctionError(
                f"reward function {name!r} returned {_snippet(r)} for sample {i}; expected a float or None",
                name, i, prompt, completion,
            )
        v = float(v)
    else:
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(r).__name__} {_snippet(r)} for sample {i}; "
            f"expected a float or None",
            name, i, prompt, completion,
        )
    if not math.isfinite(v):
        raise RewardFunctionError(
            f"reward function {name!r} returned {v} for sample {i} (prompt {_snippet(prompt)}, "
            f"completion {_snippet(completion)}); rewards must be finite floats or None",
            name, i, prompt, completion,
        )
    return v


def _validate(name: str, out: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float | None]:
    n = len(completions)
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(out).__name__}; expected a list of {n} floats/None",
            name,
        )
    if len(out) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(out)} rewards for {n} completions; "
            f"expected exactly one reward (float or None) per completion",
            name,
        )
    return [_as_float(name, i, r, prompts[i], completions[i]) for i, r in enumerate(out)]


def call_reward(
    func: RewardFunc, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
) -> list[float | None]:
    """Call ``func(prompts=..., completions=..., **columns)`` and validate its output.

    If the call raises, the batch is retried one sample at a time (columns that
    are lists of ``len(completions)`` are sliced, other keywords passed as is)
    to find the first sample that fails, and a :class:`RewardFunctionError`
    naming the function, that sample's index and its prompt/completion is raised
    from the original exception. If no single sample fails, the error names the
    function and the batch. Cost on success: one call; on failure up to
    ``len(completions)`` further calls.

    Returns one ``float`` or ``None`` per completion. Raises
    :class:`RewardFunctionError` if the output is not a list/tuple of that
    length, holds a non-number, or holds NaN/inf (naming the index).
    """
    name = reward_name(func)
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"call_reward({name!r}): {len(prompts)} prompts but {n} completions")
    try:
        out = func(prompts=prompts, completions=completions, **columns)
    except Exception as batch_exc:  # noqa: BLE001 - re-raised with context below
        for i in range(n):
            try:
                func(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **_slice_columns(columns, n, i))
            except Exception as exc:  # noqa: BLE001
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(exc).__name__}: {exc}\n"
                    f"  on sample {i} of {n}:\n"
                    f"    prompt:     {_snippet(prompts[i])}\n"
                    f"    completion: {_snippet(completions[i])}",
                    name, i, prompts[i], completions[i],
                ) from exc
        raise RewardFunctionError(
            f"reward function {name!r} raised {type(batch_exc).__name__}: {batch_exc}\n"
            f"  on a batch of {n} samples (no single sample fails on its own); "
            f"first completion: {_snippet(completions[0]) if n else '<empty batch>'}",
            name,
        ) from batch_exc
    return _validate(name, out, prompts, completions)


class WeightedSum:
    """``sum_k w_k * f_k(prompts, completions, **columns)`` as one reward callable (see :func:`weighted_sum`)."""

    def __init__(
        self,
        funcs: Sequence[RewardFunc],
        weights: Sequence[float] | None = None,
        *,
        missing: Literal["skip", "zero", "propagate"] = "skip",
        name: str | None = None,
    ) -> None:
        funcs = list(funcs)
        if not funcs:
            raise ValueError("weighted_sum needs at least one reward function")
        for f in funcs:
            if not callable(f):
                raise TypeError(f"weighted_sum: {f!r} is not callable")
        weights = [1.0] * len(funcs) if weights is None else list(weights)
        if len(weights) != len(funcs):
            raise ValueError(f"weighted_sum: {len(weights)} weights for {len(funcs)} functions")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"weighted_sum: weights must be finite numbers, got {w!r}")
        if missing not in ("skip", "zero", "propagate"):
            raise ValueError(f"missing must be 'skip', 'zero' or 'propagate', got {missing!r}")
        self.funcs = funcs
        self.weights = [float(w) for w in weights]
        self.missing = missing
        self.__name__ = name or "+".join(
            reward_name(f) if w == 1.0 else f"{w:g}*{reward_name(f)}" for f, w in zip(funcs, self.weights)
        )

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        parts = [call_reward(f, prompts, completions, **columns) for f in self.funcs]
        out: list[float | None] = []
        for i in range(len(completions)):
            total, seen = 0.0, 0
            for w, p in zip(self.weights, parts):
                r = p[i]
                if r is None:
                    if self.missing == "propagate":
                        seen = -1
                        break
                    if self.missing == "zero":
                        seen += 1
                    continue
                total += w * r
                seen += 1
            out.append(total if seen > 0 else None)
        return out

    def __repr__(self) -> str:
        return f"WeightedSum(funcs={[reward_name(f) for f in self.funcs]}, weights={self.weights}, missing={self.missing!r})"


def weighted_sum(
    funcs: Sequence[RewardFunc],
    weights: Sequence[float] | None = None,
    *,
    missing: Literal["skip", "zero", "propagate"] = "skip",
    name: str | None = None,
) -> WeightedSum:
    """Combine reward functions into ``sum_k weights[k] * funcs[k](...)``.

    Every component is called through :func:`call_reward`, so a failure names
    the component and the sample. ``weights`` default to all 1. A component
    returning ``None`` for a sample is, per ``missing``:

    - ``"skip"`` (default, what TRL itself does across reward functions): left
      out of that sample's sum; the sum is ``None`` only if every component is;
    - ``"zero"``: counted as 0 (the sum is never ``None``);
    - ``"propagate"``: makes that sample's sum ``None``.

    The result's ``__name__`` is ``name`` or e.g. ``"gsm8k_answer_reward+0.1*format_reward"``.
    """
    return WeightedSum(funcs, weights, missing=missing, name=name)
