"""Drift statistics: small pure functions comparing a window of traffic with a reference.

- PSI (population stability index) over the reference's quantile bins, for scalar statistics
  (confidence, margin, pixel mean and spread). Both histograms get a floor of ``EPSILON`` before the
  logarithm, as in Evidently's ``psi_stat_test``; 0.1 is the usual "moderate" and 0.25 the "major"
  shift (Siddiqi, *Credit Risk Scorecards*, 2006).
- Jensen-Shannon divergence (natural log, bounded by ln 2) between class distributions.
- MMD² with an RBF kernel (Gretton et al., JMLR 2012, the biased V-statistic) between embedding
  samples, with a permutation p-value: the add-one estimate ``(1 + #{perm >= observed}) / (P + 1)``
  (Phipson & Smyth 2010), which is never zero.
"""

from __future__ import annotations

import torch

EPSILON = 1e-4


def quantile_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """The ``bins - 1`` inner edges splitting ``values`` into bins of equal reference mass.

    Repeated edges (a statistic with an atom, like a confidence of exactly 1) are kept: the
    histogram then has empty bins, which PSI's floor handles.
    """
    probs = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    return torch.quantile(values.double(), probs).to(values.dtype)


def bin_counts(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Histogram counts (S, B) of values (S, n) over inner edges (S, B - 1), one row a statistic.

    A value equal to an edge falls in the bin above it. Runs on whatever device holds the values
    and never waits for it: ``index_add_`` into a preallocated tensor, where ``torch.bincount`` on
    CUDA reads the indices' min and max back to the host.
    """
    stats, bins = edges.shape[0], edges.shape[1] + 1
    index = torch.searchsorted(edges.contiguous(), values.contiguous(), right=True)
    offsets = torch.arange(stats, device=values.device).unsqueeze(1) * bins
    return count_into(
        torch.zeros(stats * bins, dtype=torch.long, device=values.device), index + offsets
    ).view(stats, bins)


def count_into(counts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Adds one to ``counts`` at every index, in place, with no host sync."""
    flat = index.flatten()
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))


def proportions(counts: torch.Tensor) -> torch.Tensor:
    """Rows of counts to rows of proportions (an empty row stays zero)."""
    counts = counts.double()
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)


def psi(reference: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Population stability index per row, from proportions (..., B)."""
    ref = reference.double().clamp_min(EPSILON)
    obs = observed.double().clamp_min(EPSILON)
    return ((obs - ref) * torch.log(obs / ref)).sum(dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions on the last axis."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        terms = torch.where(a > 0, a * torch.log(a / m.clamp_min(1e-300)), torch.zeros_like(a))
        return terms.sum(dim=-1)

    return (kl(p) + kl(q)) / 2


def median_bandwidth(x: torch.Tensor) -> float:
    """The median pairwise Euclidean distance: the usual RBF bandwidth heuristic."""
    distances = torch.cdist(x.double(), x.double())
    upper = distances[torch.triu_indices(len(x), len(x), offset=1).unbind()]
    return float(upper.median().clamp_min(1e-12))


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(x.double(), y.double()).square() / (2 * bandwidth**2))


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Biased MMD² between samples x (n, E) and y (m, E) under an RBF kernel."""
    return float(_mmd2_split(rbf_kernel(torch.cat([x, y]), torch.cat([x, y]), bandwidth), len(x)))


def _mmd2_split(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """MMD² for a pooled kernel matrix whose first n rows are one sample."""
    m = kernel.shape[0] - n
    weights = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).to(kernel)
    return weights @ kernel @ weights


def mmd_permutation_test(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidth: float,
    permutations: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(MMD², p-value) of x against y, permuting the pooled sample's labels.

    All permutations are scored at once as ``diag(W K Wᵀ)``, W holding ±1/n weights per row, so
    the pooled kernel matrix is computed once.
    """
    n, m = len(x), len(y)
    kernel = rbf_kernel(torch.cat([x, y]), torch.cat([x, y]), bandwidth)
    observed = _mmd2_split(kernel, n)
    order = torch.argsort(torch.rand(permutations, n + m, generator=generator), dim=1)
    weights = torch.where(order < n, 1.0 / n, -1.0 / m).to(kernel)
    permuted = ((weights @ kernel) * weights).sum(dim=1)
    exceed = int((permuted >= observed - 1e-12).sum())
    return float(observed), (1 + exceed) / (permutations + 1)
