"""Trajectories: who is revealed when (docs/ESOLM.md §3). Pure functions of a generator; no model.

A trajectory over ``N`` completion positions is an order ``σ`` (per sample) and step sizes
``k_1..k_K`` (shared by the batch: step sizes do not depend on the model, so sharing them
costs nothing in exactness and keeps batches rectangular). Orders and step sizes are drawn
independently of the model, so ``Π_j p_θ(y_j | context_j)`` is the exact probability of the
trajectory's tokens and its gradient is exact.
"""

from __future__ import annotations

import enum

from dataclasses import dataclass

import torch

EPS = 1e-3  # the log-linear schedule's ε (reference implementation)


@dataclass
class Trajectory:
    """``order``: ``(B, N)`` long, ``order[b, i]`` = completion position revealed i-th.
    ``step_sizes``: ``(K,)`` long, ``Σ k_i = N``, shared by all rows."""

    order: torch.Tensor
    step_sizes: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.step_sizes.numel())

    def steps_by_position(self) -> torch.Tensor:
        """``(B, N)`` step index (1-based) of every completion *position*."""
        B, N = self.order.shape
        step_of_rank = torch.repeat_interleave(torch.arange(1, self.num_steps + 1, device=self.order.device), self.step_sizes.to(self.order.device))
        steps = torch.empty_like(self.order)
        steps.scatter_(1, self.order, step_of_rank.expand(B, N))
        return steps

    def validate(self, n: int | None = None) -> None:
        """Raise ``ValueError`` unless ``order`` rows are permutations and the sizes sum to N."""
        validate_trajectory(self.order, self.step_sizes, n)


def validate_trajectory(order: torch.Tensor, step_sizes: torch.Tensor, n: int | None = None) -> None:
    if order.dim() != 2:
        raise ValueError(f"trajectory order must have shape (B, N), got {tuple(order.shape)}")
    N = order.shape[1]
    if n is not None and N != n:
        raise ValueError(f"trajectory order covers {N} positions, expected {n}")
    srt = order.sort(dim=1).values
    if not torch.equal(srt, torch.arange(N, device=order.device).expand_as(srt)):
        bad = int((srt != torch.arange(N, device=order.device)).any(1).nonzero()[0])
        raise ValueError(f"trajectory order of row {bad} is not a permutation of 0..{N - 1}")
    if (step_sizes <= 0).any():
        raise ValueError(f"step sizes must be positive, got {step_sizes.tolist()}")
    if int(step_sizes.sum()) != N:
        raise ValueError(f"step sizes sum to {int(step_sizes.sum())}, but the order has N = {N} positions")


def alpha(t: torch.Tensor | float, alpha0: float, eps: float = EPS):
    """``α_t = α0 · (1 − (1 − ε) t)``: the expected clean fraction at time t (log-linear)."""
    return alpha0 * (1 - (1 - eps) * t)


def unified_step_sizes(n: int, alpha0: float, num_steps: int, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Step sizes of the unified Eso-LM schedule ``(α0, T)``.

    Diffusion phase: for ``t`` in ``linspace(1, 1/T, T)``, ``s = t − 1/T``, draw
    ``Binomial(remaining, (α_s − α_t)/(1 − α_t))`` and keep the non-empty steps. Then every
    position not yet revealed is revealed one per step (sequential phase).

    Returns ``(sizes, n_diffusion)``: all step sizes and how many positions diffusion covers.
    """
    if not 0.0 <= alpha0 <= 1.0:
        raise ValueError(f"alpha0 must be in [0, 1], got {alpha0}")
    if num_steps < 1:
        raise ValueError(f"num_steps (T) must be >= 1, got {num_steps}")
    sizes: list[int] = []
    remaining = n
    if alpha0 > 0:
        ts = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        for i, t in enumerate(ts):
            if remaining == 0:
                break
            s = t - 1.0 / num_steps
            a_t, a_s = alpha(t, alpha0), alpha(s, alpha0)
            p = float(((a_s - a_t) / (1 - a_t)).clamp(0.0, 1.0))
            if alpha0 >= 1.0 and i == num_steps - 1:
                p = 1.0  # α_s = 1 at the last step: everything left is revealed (guard float error)
            k = int(torch.binomial(torch.tensor([float(remaining)], dtype=torch.float64), torch.tensor([p], dtype=torch.float64), generator=generator).item())
            if k > 0:
                sizes.append(k)
                remaining -= k
    n_diff = n - remaining
    sizes.extend([1] * remaining)
    return sizes, n_diff


def _rand_perm_rows(b: int, n: int, generator: torch.Generator | None, row_generators=None) -> torch.Tensor:
    """``b`` random permutations of ``range(n)``; row ``i`` from ``row_generators[i]`` when
    given (orders keyed per sample: the same sample gets the same σ on 1 or 8 ranks)."""
    if row_generators is not None:
        if len(row_generators) != b:
            raise ValueError(f"{len(row_generators)} row generators for {b} rows")
        return torch.stack([torch.argsort(torch.rand(n, generator=g, dtype=torch.float64)) for g in row_generators]) if b else torch.empty(0, n, dtype=torch.long)
    return torch.argsort(torch.rand(b, n, generator=generator, dtype=torch.float64), dim=1)


def unified(batch_size: int, n: int, alpha0: float, num_steps: int, generator: torch.Generator | None = None, row_generators=None) -> Trajectory:
    """The unified Eso-LM schedule: diffusion positions are a uniformly random subset of the
    completion, revealed in uniformly random order; the rest left to right, one per step.
    ``α0 = 1``: pure diffusion; ``α0 = 0``: pure left-to-right AR."""
    sizes, n_diff = unified_step_sizes(n, alpha0, num_steps, generator)
    perm = _rand_perm_rows(batch_size, n, generator, row_generators)
    diff_part = perm[:, :n_diff]
    seq_part = perm[:, n_diff:].sort(dim=1).values  # sequential phase: left to right
    return Trajectory(torch.cat([diff_part, seq_part], 1), torch.tensor(sizes, dtype=torch.long))


def fixed_k(batch_size: int, n: int, k: int, generator: torch.Generator | None = None, row_generators=None) -> Trajectory:
    """Uniformly random order, ``k`` tokens per step (last step smaller)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sizes = [k] * (n // k) + ([n % k] if n % k else [])
    return Trajectory(_rand_perm_rows(batch_size, n, generator, row_generators), torch.tensor(sizes, dtype=torch.long))


def block_ar(batch_size: int, n: int, block_size: int, steps_per_block: int, generator: torch.Generator | None = None, row_generators=None) -> Trajectory:
    """Block-AR: blocks of ``block_size`` left to right; inside a block a random order revealed
    in ``steps_per_block`` near-equal steps."""
    if block_size < 1 or steps_per_block < 1:
        raise ValueError("block_size and steps_per_block must be >= 1")
    orders, sizes = [], []
    for start in range(0, n, block_size):
        m = min(block_size, n - start)
        orders.append(start + _rand_perm_rows(batch_size, m, generator, row_generators))
        s = min(steps_per_block, m)
        sizes += [m // s + (1 if i < m % s else 0) for i in range(s)]
    return Trajectory(torch.cat(orders, 1), torch.tensor(sizes, dtype=torch.long))


def subcontext(batch_size: int, n: int, num_steps: int, alpha0: float = 1.0, shuffle: bool = False, generator: torch.Generator | None = None, row_generators=None) -> Trajectory:
    """The reference's "subcontext" order: cut the sequence into ``n / S`` chunks of length
    ``S = num_steps``; step b reveals position b of every chunk. ``shuffle`` permutes the steps
    and the order inside each step. For ``α0 < 1`` only the first ``int(S·α0)`` steps are
    diffusion steps; the remaining positions are then revealed left to right one per step."""
    S = num_steps
    if n % S != 0:
        raise ValueError(f"subcontext needs n ({n}) divisible by num_steps ({S})")
    chunks = n // S
    step_ids = torch.arange(S)
    if shuffle:
        step_ids = step_ids[torch.randperm(S, generator=generator)]
    n_diff_steps = S if alpha0 >= 1 else int(S * alpha0)
    rows = []
    for r in range(batch_size):
        parts = []
        g = row_generators[r] if row_generators is not None else generator
        for b in step_ids[:n_diff_steps].tolist():
            pos = b + S * torch.arange(chunks)
            if shuffle:
                pos = pos[torch.randperm(chunks, generator=g)]
            parts.append(pos)
        diff = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        rest = torch.ones(n, dtype=torch.bool)
        rest[diff] = False
        rows.append(torch.cat([diff, rest.nonzero().flatten()]))
    sizes = [chunks] * n_diff_steps + [1] * (n - chunks * n_diff_steps)
    return Trajectory(torch.stack(rows), torch.tensor(sizes, dtype=torch.long))


def user_order(order: torch.Tensor, step_sizes) -> Trajectory:
    """A user-supplied trajectory (validated)."""
    traj = Trajectory(torch.as_tensor(order, dtype=torch.long), torch.as_tensor(step_sizes, dtype=torch.long))
    traj.validate()
    return traj


@dataclass
class ScheduleConfig:
    """How a sampler reveals tokens. ``kind``: ``unified`` (``alpha0``, ``num_steps``),
    ``fixed_k`` (``k``), ``block_ar`` (``block_size``, ``num_steps`` per block),
    ``subcontext`` (``num_steps``, ``alpha0``, ``shuffle``)."""

    kind: str = "unified"
    alpha0: float = 1.0
    num_steps: int = 32
    k: int = 1
    block_size: int = 32
    shuffle: bool = True

    def sample(self, batch_size: int, n: int, generator: torch.Generator | None = None, row_generators=None) -> Trajectory:
        """Step sizes from ``generator`` (shared by the batch); each row's order from
        ``row_generators[row]`` if given, else from ``generator``."""
        if self.kind == "unified":
            return unified(batch_size, n, self.alpha0, self.num_steps, generator, row_generators)
        if self.kind == "fixed_k":
            return fixed_k(batch_size, n, self.k, generator, row_generators)
        if self.kind == "block_ar":
            return block_ar(batch_size, n, self.block_size, self.num_steps, generator, row_generators)
        if self.kind == "subcontext":
            return subcontext(batch_size, n, self.num_steps, self.alpha0, self.shuffle, generator, row_generators)
        raise ValueError(f"schedule kind must be unified, fixed_k, block_ar or subcontext, got {self.kind!r}")


class Stream(enum.IntEnum):
    """The purpose key of every random stream (the first key after the seed in
    :func:`make_generator`): one list, so that no two uses share a stream by accident. The
    values are part of the reproducibility contract (a run's rollouts, masks and data order are
    functions of them): never renumber, only add."""

    TRAIN = 1  # training-objective noise: t, masks, orders (objective.py)
    DATA = 2  # pretraining data order (train/pretrain.py)
    ROLLOUT = 3  # the sampler's uniforms per (step, sample) (sampling.py)
    MC = 4  # Monte Carlo estimators' draws per sample (likelihood.py)
    TRAJ = 5  # rollout trajectories: orders per sample, step sizes per batch (policy.py)
    PROMPTS = 6  # PPO's prompt order per epoch (rl/base.py)
    EST = 7  # the estimator noise seed per (generation step, inner iteration) (rl/)
    SHUFFLE = 8  # PPO's mini-batch shuffles (rl/ppo.py)
    DIAG_ROWS = 9  # rows of the comparison's diagnostic batches (rl/grpo_trainer.py)
    DIAG_TRAJ = 10  # fresh trajectories of the T-step ELBO (compare/diagnostics.py)
    LL_ORDER = 21  # lm-eval: random scoring orders per request (lm_eval_model.py)
    LL_SIZES = 22  # lm-eval: their step sizes
    GEN_ORDER = 23  # lm-eval: generation orders per request
    GEN_SIZES = 24  # lm-eval: generation step sizes
    GEN_NOISE = 25  # lm-eval: sampling uniforms


def make_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator keyed by ``(seed, *keys)`` (a :class:`Stream`, then e.g. the step and the
    global sample index): all randomness in esorl comes from such generators, never from
    global state."""
    h = seed & 0xFFFFFFFFFFFF
    for k in keys:
        h = (h * 0x100000001B3 ^ (int(k) & 0xFFFFFFFF)) % (2**61 - 1)
    g = torch.Generator()
    g.manual_seed(h)
    return g
