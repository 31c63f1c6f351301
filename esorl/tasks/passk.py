"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", eq. 1): with ``n`` samples of which ``c`` are correct,
``pass@k = 1 − C(n − c, k) / C(n, k)``, computed as a product to stay exact for large ``n``."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``n``
    (``c`` correct) is correct. Raises ``ValueError`` unless ``0 ≤ c ≤ n`` and ``1 ≤ k ≤ n``."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
