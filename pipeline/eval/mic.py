"""The maximal information coefficient (MIC) by ApproxMaxMI (Reshef et al., Science 2011), batched.

For ``n`` samples of a pair ``(x, y)``, MIC is the largest normalised mutual information over grids of
``nx`` columns and ``ny`` rows with ``nx * ny <= B`` (``B = n ** alpha``, ``alpha = 0.6`` by default)::

    M[nx, ny] = max over grids G of I(G) / log(min(nx, ny));   MIC = max over nx * ny <= B of M[nx, ny]

Finding the best grid exactly is intractable, so the paper's ApproxMaxMI (its supplement, Algorithms 1-5)
fixes one axis to an equal-frequency partition and optimises the other by dynamic programming; doing it
both ways round and keeping the better value of each cell gives the approximate characteristic matrix.
Steps, as the supplement defines them (and where it is silent, as the reference C library ``minepy``
resolves it, so that the values published with that library can be checked):

1. **EquipartitionYAxis**: sort by ``y`` and fill ``ny`` rows of about ``n / ny`` points; runs of equal
   values are never split, and a run joins the current row only if that brings the row closer to its
   target size (after each row the target becomes ``remaining points / remaining rows``). Ties can leave
   fewer rows ``q`` than asked; the score is then normalised by ``log(min(nx, q))``.
2. **Clumps**: sort by ``x``; consecutive points in the same row form a clump (points with equal ``x`` in
   different rows form one clump of their own). Columns only ever break between clumps.
3. **Superclumps**: more than ``k = c * nx_max`` clumps are merged into ``k`` equal-frequency superclumps
   (``c = 15`` by default).
4. **OptimizeXAxis**: for every number of columns ``l <= nx_max``, the partition of the clumps into at most
   ``l`` columns that maximises ``I(columns; rows)``. With ``H(Q)`` fixed this minimises
   ``sum over columns of n_col * H(rows | col)``, an additive cost, so a dynamic programme over clump
   boundaries (best cost of the first ``t`` clumps in ``l`` columns) is exact.

Everything is vectorised over a batch of variable pairs (the channels of a feature map), in torch so it
runs on a GPU when one is given. Cost per pair is ``O(sum over ny of nx_max * k**2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MineConfig", "characteristic_matrix", "mic", "mine_stats"]


@dataclass(frozen=True)
class MineConfig:
    """ApproxMaxMI's parameters.

    Attributes:
        alpha: grid budget ``B = max(n ** alpha, 4)``; the DVT paper uses ``B = (HW) ** 0.6``.
        c: clump factor: at most ``c * nx`` (super)clumps when drawing ``nx`` columns.
        chunk_elements: cap on the elements of one dynamic-programming tensor (memory bound).
        double: run the dynamic programme in float64 (``False``: float32, about twice as fast on a CPU;
            scores then differ by ~1e-6).
    """

    alpha: float = 0.6
    c: float = 15.0
    chunk_elements: int = 1 << 23
    double: bool = True

    def budget(self, n: int) -> float:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"MineConfig.alpha must be in (0, 1], got {self.alpha}.")
        if self.c <= 0:
            raise ValueError(f"MineConfig.c must be > 0, got {self.c}.")
        return max(n ** self.alpha, 4.0)


def _groups(sorted_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of equal values in each sorted row of ``(m, n)``: per point its run index, and per run (padded to
    ``n`` with start ``n`` and size 0) the start position and the size."""
    m, n = sorted_values.shape
    new = torch.ones_like(sorted_values, dtype=torch.bool)
    new[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    gid = new.long().cumsum(1) - 1
    pos = torch.arange(n, device=sorted_values.device).expand(m, n)
    starts = torch.where(new, pos, torch.full_like(pos, n)).sort(1).values
    sizes = torch.diff(starts, dim=1, append=torch.full((m, 1), n, device=starts.device))
    sizes = torch.where(starts < n, sizes, torch.zeros_like(sizes))
    return gid, starts, sizes


def _equipartition(sorted_values: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EquipartitionYAxis of each sorted row of ``(m, n)`` into at most ``rows`` rows: the row of each
    point ``(m, n)`` and the number of rows used ``(m,)``.

    A run of ``s`` equal values starting after ``f > 0`` points of the current row joins it iff
    ``|f + s - t| < |f - t|``, i.e. iff its midpoint ``f + s / 2`` is below the row's target ``t``; so the
    next row starts at the first run whose midpoint reaches ``start + t``: one search per row, batched.
    """
    m, n = sorted_values.shape
    gid, starts, sizes = _groups(sorted_values)
    mids = torch.where(sizes > 0, starts.double() + sizes.double() / 2.0,
                       torch.full_like(starts, math.inf, dtype=torch.float64))
    n_groups = (sizes > 0).sum(1)
    flags = torch.zeros(m, n + 1, dtype=torch.bool, device=sorted_values.device)
    at = torch.zeros(m, dtype=torch.long, device=sorted_values.device)  # run index where the row starts
    idx = torch.arange(m, device=sorted_values.device)
    for r in range(rows - 1):
        start = starts[idx, at].double()
        target = (n - start) / (rows - r)
        nxt = torch.searchsorted(mids, (start + target)[:, None], side="left")[:, 0]
        nxt = torch.maximum(nxt, at + 1)
        ok = nxt < n_groups
        if not ok.any():
            break
        flags[idx[ok], nxt[ok]] = True
        at = torch.where(ok, nxt, at)
    row_of_group = flags[:, :n].long().cumsum(1)
    return row_of_group.gather(1, gid), flags.sum(1) + 1


def _clumps(sorted_x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GetClumpsPartition: points sorted by ``x`` with their ``rows``; returns the clump of each point and the
    number of clumps. Equal ``x`` values spread over several rows become a clump of their own."""
    m, n = sorted_x.shape
    gid, _, _ = _groups(sorted_x)
    lo = torch.full((m, n), n, dtype=torch.long, device=rows.device).scatter_reduce(1, gid, rows, "amin")
    hi = torch.full((m, n), -1, dtype=torch.long, device=rows.device).scatter_reduce(1, gid, rows, "amax")
    mixed = (lo != hi).gather(1, gid)
    label = torch.where(mixed, -1 - gid, rows)
    change = torch.zeros_like(label, dtype=torch.bool)
    change[:, 1:] = label[:, 1:] != label[:, :-1]
    clump = change.long().cumsum(1)
    return clump, clump[:, -1] + 1


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t * torch.log(t.clamp_min(1e-300)), torch.zeros_like(t))


def _optimize_x_axis(clump: torch.Tensor, n_clumps: torch.Tensor, rows: torch.Tensor, n_rows: torch.Tensor,
                     max_cols: int, chunk_elements: int, dtype: torch.dtype) -> torch.Tensor:
    """OptimizeXAxis: normalised ``I`` of the best partition into at most ``l`` columns, ``l = 2..max_cols``,
    as ``(m, max_cols - 1)``."""
    m, n = clump.shape
    p = int(n_clumps.max())
    q = int(n_rows.max())
    counts = torch.zeros(m, p * q, dtype=torch.long, device=clump.device)
    counts.scatter_add_(1, clump * q + rows, torch.ones_like(clump))
    cum = torch.cat([counts.new_zeros(m, 1, q), counts.view(m, p, q).cumsum(1)], 1)  # (m, p + 1, q)
    xlogx = _xlogx(torch.arange(n + 1, dtype=torch.float64, device=clump.device))  # counts are integers
    hq = (xlogx[n] - xlogx[cum[:, -1]].sum(1)) / n
    out = torch.zeros(m, max_cols - 1, dtype=torch.float64, device=clump.device)
    lower = torch.tril(torch.ones(p + 1, p + 1, dtype=torch.bool, device=clump.device), diagonal=-1)
    chunk = max(1, chunk_elements // (p + 1) ** 2)
    for a in range(0, m, chunk):
        cm = cum[a:a + chunk]
        tot = cm.sum(-1)
        # cost[t, s] = n_col * H(rows | col) of the column of clumps s+1..t: f(n_col) - sum_r f(n_col,r)
        cost = torch.take(xlogx, (tot[:, :, None] - tot[:, None, :]).clamp_min_(0))
        for r in range(q):
            cost -= torch.take(xlogx, (cm[:, :, None, r] - cm[:, None, :, r]).clamp_min_(0))
        cost = torch.where(lower, cost, torch.full_like(cost, math.inf)).to(dtype)
        best = cost[:, :, 0].contiguous()  # one column over the first t clumps
        buf = torch.empty_like(cost)
        for cols in range(2, max_cols + 1):  # min-plus product, laid out so the reduction is contiguous
            best = torch.minimum(best, torch.add(cost, best[:, None, :], out=buf).amin(2))
            out[a:a + chunk, cols - 2] = hq[a:a + chunk] - best[:, p].double() / n
    log_cols = torch.log(torch.arange(2, max_cols + 1, dtype=torch.float64, device=clump.device))
    norm = torch.minimum(log_cols[None, :], torch.log(n_rows.double().clamp_min(1))[:, None])
    score = torch.where(norm > 0, out / norm.clamp_min(1e-300), torch.zeros_like(out))
    return torch.where(((n_clumps > 1) & (n_rows > 1))[:, None], score.clamp_min(0), torch.zeros_like(score))


def _half(x: torch.Tensor, y: torch.Tensor, budget: float, config: MineConfig, out: torch.Tensor,
          transpose: bool) -> None:
    """Rows from ``y``, columns optimised over ``x``; writes ``out[:, nx, ny]`` (or ``[:, ny, nx]``)."""
    y_sorted, y_order = y.sort(dim=1, stable=True)
    x_sorted, x_order = x.sort(dim=1, stable=True)
    for ny in range(2, int(budget // 2) + 1):
        max_cols = int(budget // ny)
        if max_cols < 2:
            break
        rows_y, n_rows = _equipartition(y_sorted, ny)
        rows = torch.empty_like(rows_y).scatter_(1, y_order, rows_y).gather(1, x_order)  # in x order
        clump, n_clumps = _clumps(x_sorted, rows)
        k_hat = max(int(config.c * max_cols), 1)
        if int(n_clumps.max()) > k_hat:
            supers, n_supers = _equipartition(clump.double(), k_hat)
            many = (n_clumps > k_hat)[:, None]
            clump = torch.where(many, supers, clump)
            n_clumps = torch.where(many[:, 0], n_supers, n_clumps)
        scores = _optimize_x_axis(clump, n_clumps, rows, n_rows, max_cols, config.chunk_elements,
                                  torch.float64 if config.double else torch.float32)
        cols = torch.arange(2, max_cols + 1, device=out.device)
        if transpose:
            out[:, ny, cols] = torch.maximum(out[:, ny, cols], scores.to(out))
        else:
            out[:, cols, ny] = torch.maximum(out[:, cols, ny], scores.to(out))


def characteristic_matrix(x: torch.Tensor, y: torch.Tensor, config: MineConfig | None = None) -> torch.Tensor:
    """Approximate characteristic matrices of a batch of pairs.

    Args:
        x, y: ``(m, n)`` (or ``(n,)``) samples; ``x`` may also be ``(n,)`` shared by every row of ``y``.

    Returns:
        ``(m, S, S)`` with ``M[:, nx, ny]`` for ``nx * ny <= B`` and ``-inf`` elsewhere (``S = B // 2 + 1``).
    """
    config = config or MineConfig()
    y = torch.as_tensor(y).double()
    y = y[None] if y.ndim == 1 else y
    x = torch.as_tensor(x).double().to(y.device)
    x = x.expand_as(y) if x.ndim == 1 else x
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"characteristic_matrix: x {tuple(x.shape)} and y {tuple(y.shape)} must be (m, n).")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("characteristic_matrix: samples contain NaN or Inf.")
    m, n = y.shape
    budget = config.budget(n)
    size = int(budget // 2) + 1
    out = torch.full((m, size, size), -math.inf, dtype=torch.float64, device=y.device)
    grid = torch.arange(size, device=y.device)
    allowed = (grid[:, None] * grid[None, :] <= budget) & (grid[:, None] >= 2) & (grid[None, :] >= 2)
    out[:, allowed] = 0.0
    _half(x.contiguous(), y.contiguous(), budget, config, out, transpose=False)
    _half(y.contiguous(), x.contiguous(), budget, config, out, transpose=True)
    return out


def mic(x: torch.Tensor, y: torch.Tensor, config: MineConfig | None = None) -> torch.Tensor:
    """MIC of each pair: ``(m,)`` (see :func:`characteristic_matrix` for the shapes)."""
    return characteristic_matrix(x, y, config).flatten(1).amax(1)


def mine_stats(x: torch.Tensor, y: torch.Tensor, config: MineConfig | None = None) -> dict[str, float]:
    """MIC and the other MINE statistics of one pair, as Reshef et al. define them: MAS (largest asymmetry
    ``|M[a, b] - M[b, a]|``), MEV (MIC over grids with two rows or two columns) and MCN (``log2`` of the
    fewest cells that reach MIC, within 1e-4)."""
    mat = characteristic_matrix(x, y, config)[0]
    top = float(mat.max())
    ok = torch.isfinite(mat)
    sym = ok & ok.T
    mas = float((mat - mat.T)[sym].abs().max()) if sym.any() else 0.0
    edge = ok.clone()
    edge[3:, 3:] = False
    grid = torch.arange(mat.shape[0], dtype=torch.float64)
    cells = torch.log2(grid[:, None] * grid[None, :])
    reach = ok & (mat + 1e-4 >= top)
    return {"mic": top, "mas": mas, "mev": float(mat[edge].max()), "mcn": float(cells[reach].min())}
