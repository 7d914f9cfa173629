"""pass@k: the chance that at least one of k samples is correct, estimated from n >= k samples.

Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374), eq. 1:
with n samples per problem of which c are correct, the unbiased estimator is

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems. Drawing k of the n samples without replacement, C(n - c, k) / C(n, k) is
the probability that all k are wrong. It is computed as the product prod_{i=n-c+1}^{n} (1 - k / i),
which equals the binomial ratio and never forms large binomials (the paper's Figure 3 does the same).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples.

    1.0 when fewer than k samples are wrong (every k-subset holds a correct one).

    Raises:
        ConfigError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 <= correct <= samples, got correct={c}, samples={n}")
    if not 1 <= k <= n:
        raise ConfigError(f"pass@{k} needs 1 <= k <= samples per problem ({n}); draw more samples or lower k")
    if n - c < k:
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (samples n, correct c)."""
    if not counts:
        raise ConfigError("pass@k of an empty set of problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
