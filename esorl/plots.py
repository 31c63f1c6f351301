"""Figures every esorl command writes: checked for labelled axes and matching legends before
they are saved (:func:`check_figure`), and the reward curve of one RL run. A leaf module
(matplotlib and the metrics reader only), so that trainers, the evaluation and the
comparison report can all use it without importing each other."""

from __future__ import annotations

from pathlib import Path

from .train.common import read_metrics


def _series(recs, key):
    return [(r["step"], r[key]) for r in recs if key in r and isinstance(r[key], (int, float))]


def plot_reward_curve(metrics_path: Path, png: Path, title: str = "") -> Path:
    """Mean training reward per step (and held-out ``eval_reward`` where logged) of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = _series(recs, "reward")
    ev = _series(recs, "eval_reward")
    if tr:
        ax.plot(*zip(*tr), label="train reward (mean over the step's completions)")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out prompts (eval_reward)")
    ax.set_xlabel("step"), ax.set_ylabel("reward per completion (mean)"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    save_figure(fig, png)
    return png


def check_figure(fig) -> None:
    """Every plot a user gets has labelled axes and a legend that matches what is drawn:
    raise ``ValueError`` naming the panel otherwise (a check, not a test-only helper)."""
    for ax in fig.axes:
        name = ax.get_title() or "(untitled panel)"
        if not ax.get_xlabel() or not ax.get_ylabel():
            raise ValueError(f"plot panel {name!r} has no {'x' if not ax.get_xlabel() else 'y'}-axis label")
        leg = ax.get_legend()
        handles, labels = ax.get_legend_handles_labels()
        if len(labels) > 1 and leg is None:
            raise ValueError(f"plot panel {name!r} draws {len(labels)} labelled series without a legend")
        if leg is not None and [t.get_text() for t in leg.get_texts()] != labels:
            raise ValueError(f"plot panel {name!r}: the legend does not match the series drawn")


def save_figure(fig, path: Path) -> Path:
    """Check (:func:`check_figure`), save as PNG (120 dpi) and close."""
    import matplotlib.pyplot as plt

    check_figure(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
