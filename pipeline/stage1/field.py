"""Neural-field building blocks, batched over independent images.

Every module here holds the parameters of ``B`` independent problems in one tensor with a leading batch
dimension, so fitting ``B`` images is one set of batched tensor ops (``bmm``, one gather, one
``grid_sample``) rather than ``B`` small ones. Each image's slice is initialised from its own generator,
so an image's initial state does not depend on which other images share the batch.

* :class:`HashGrid`: multi-resolution hash encoding (Instant-NGP, tiny-cuda-nn's ``HashGrid``) in pure
  PyTorch, vectorised over levels; coarse levels whose grid fits the table are indexed densely.
* :class:`BatchedMLP`: an MLP whose weights are ``(B, in, out)``, evaluated with ``baddbmm``.
* :class:`BatchedGrid`: a dense ``(B, C, H, W)`` map sampled bilinearly (the artifact map ``G``, and the
  cheap dense field ``F`` of the default preset).
* :class:`FieldConfig` / :func:`create_field`: the clean-feature field ``F: (x, y) -> R^C``.
* :class:`GridInterp`: a dense grid read at fixed points as a sparse matrix (the closed-form solves' operator).

Coordinates are global ``(x, y)`` in ``[0, 1]`` (see :mod:`pipeline.vit.views`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HashGridConfig", "HashGrid", "BatchedMLP", "BatchedGrid", "FieldConfig", "HashField",
           "GridField", "GridInterp", "bilinear_weights", "create_field"]

_PRIME_Y = 2654435761  # tiny-cuda-nn's second coordinate prime (the first is 1)


def _uniform(shape: Sequence[int], bound: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``U(-bound, bound)`` of shape ``(B, *shape)``, image ``b`` drawn from ``generators[b]`` on the CPU."""
    return torch.stack([torch.empty(*shape).uniform_(-bound, bound, generator=g) for g in generators])


def _normal(shape: Sequence[int], std: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(*shape, generator=g) * std for g in generators])


@dataclass(frozen=True)
class HashGridConfig:
    """Multi-resolution hash encoding; defaults are the DVT reference (tiny-cuda-nn ``HashGrid``)."""

    levels: int = 16
    features_per_level: int = 8
    log2_table_size: int = 20
    base_resolution: int = 16
    max_resolution: int = 1024
    init_scale: float = 1e-4

    def __post_init__(self) -> None:
        if self.levels < 1 or self.features_per_level < 1:
            raise ValueError(f"HashGridConfig needs levels >= 1 and features_per_level >= 1, got {self}.")
        if not 1 <= self.base_resolution <= self.max_resolution:
            raise ValueError(f"HashGridConfig needs 1 <= base_resolution <= max_resolution, got {self}.")
        if not 4 <= self.log2_table_size <= 30:
            raise ValueError(f"HashGridConfig.log2_table_size must be in [4, 30], got {self.log2_table_size}.")

    @property
    def out_dim(self) -> int:
        return self.levels * self.features_per_level


class HashGrid(nn.Module):
    """Batched 2-D multi-resolution hash encoding: ``(B, N, 2)`` in ``[0, 1]`` -> ``(B, N, L * F)``.

    Level ``l`` has ``scale_l = base * b**l - 1`` and ``ceil(scale_l) + 2`` grid points per axis (as in
    tiny-cuda-nn, plus one so the upper corner at ``x = 1`` exists). Levels whose ``res**2`` points fit in
    ``2**log2_table_size`` entries are indexed densely (no collisions), finer ones with tiny-cuda-nn's
    spatial hash. All levels share one flat table per image,
    so the whole encoding is one ``embedding`` gather of ``4 * L`` corners per point.
    """

    def __init__(self, config: HashGridConfig, generators: Sequence[torch.Generator]):
        super().__init__()
        self.config = config
        c = config
        growth = math.exp((math.log(c.max_resolution) - math.log(c.base_resolution)) / max(1, c.levels - 1))
        table = 2 ** c.log2_table_size
        scales = [c.base_resolution * growth ** level - 1 for level in range(c.levels)]
        res = [int(math.ceil(s)) + 2 for s in scales]  # pos = x * scale + 0.5 and its upper corner fit
        sizes = [min(r * r, table) for r in res]
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("res", torch.tensor(res, dtype=torch.long), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("dense", torch.tensor([r * r <= table for r in res]), persistent=False)
        self.entries = sum(sizes)
        self.table = nn.Parameter(_uniform((self.entries, c.features_per_level), c.init_scale, generators))

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        b, n, _ = coords.shape
        pos = coords.float()[:, :, None, :] * self.scales[:, None] + 0.5  # (B, N, L, 2)
        base = torch.floor(pos)
        frac = pos - base
        base = base.long()
        corners = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=coords.device)
        ij = base[:, :, :, None, :] + corners  # (B, N, L, 4, 2)
        res = self.res[:, None]
        ij = torch.minimum(ij.clamp_min(0), res[..., None] - 1)
        x, y = ij[..., 0], ij[..., 1]
        dense_idx = x + y * res
        hashed_idx = torch.bitwise_xor(x, y * _PRIME_Y) % self.sizes[:, None]
        idx = torch.where(self.dense[:, None], dense_idx, hashed_idx) + self.offsets[:, None]
        idx = idx + (torch.arange(b, device=coords.device) * self.entries).view(b, 1, 1, 1)
        fx, fy = frac[..., 0:1], frac[..., 1:2]
        w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)  # (B, N, L, 1, 4)
        feats = _gather_rows(self.table.view(-1, self.config.features_per_level), idx)  # (B, N, L, 4, F)
        out = (w.to(feats.dtype) @ feats).squeeze(-2)  # (B, N, L, F)
        return out.reshape(b, n, self.out_dim)


class _GatherRows(torch.autograd.Function):
    """``table[idx]`` whose backward is one ``index_add_`` into a zeroed dense gradient: on a CPU several times
    faster than ``embedding``'s dense backward for the paper preset's 20M-entry tables (same sums)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = table.shape[0]
        return table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, grad.shape[-1])
        out.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return out, None


def _gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _GatherRows.apply(table, idx)


class BatchedMLP(nn.Module):
    """``B`` independent MLPs with ReLU between layers; weights ``(B, in, out)``, PyTorch ``Linear`` init."""

    def __init__(self, dims: Sequence[int], generators: Sequence[torch.Generator]):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(self.dims[:-1], self.dims[1:]):
            bound = 1 / math.sqrt(d_in)
            self.weights.append(nn.Parameter(_uniform((d_in, d_out), bound, generators)))
            self.biases.append(nn.Parameter(_uniform((1, d_out), bound, generators)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w) if torch.is_autocast_enabled(x.device.type) else \
                torch.baddbmm(b.to(x.dtype), x, w.to(x.dtype))
            if k < last:
                x = torch.relu(x)
        return x


class BatchedGrid(nn.Module):
    """A dense ``(B, C, H, W)`` map sampled bilinearly at ``(x, y)`` coordinates.

    With ``span=((x_lo, x_hi), (y_lo, y_hi))`` the corner nodes sit exactly at those coordinates
    (``align_corners=True``); coordinates outside the span take the border value.
    """

    def __init__(self, channels: int, shape: tuple[int, int], generators: Sequence[torch.Generator],
                 span: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 1.0), (0.0, 1.0)),
                 init_std: float = 0.0, device: torch.device | str | None = None):
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.span = span
        # Random starts come from the images' CPU generators (the same on every device); a zero start is made
        # where the fit runs (for F that is 16 MB an image at 518 px: filling and copying it cost the host more
        # than the rest of the set-up).
        init = _normal((channels, *self.shape), init_std, generators).to(device) if init_std > 0 else \
            torch.zeros(len(generators), channels, *self.shape, device=device)
        self.grid = nn.Parameter(init)

    def to_unit(self, coords: torch.Tensor) -> torch.Tensor:
        """Map ``(x, y)`` to grid_sample's ``[-1, 1]`` with corner nodes at the span ends."""
        (x0, x1), (y0, y1) = self.span
        lo = coords.new_tensor([x0, y0])
        size = coords.new_tensor([max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)])
        return (coords - lo) / size * 2 - 1

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords (B, N, 2)`` -> ``(B, N, C)``."""
        grid = self.to_unit(coords.float())[:, None]  # (B, 1, N, 2)
        out = F.grid_sample(self.grid.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out[:, :, 0].transpose(1, 2)


@dataclass(frozen=True)
class FieldConfig:
    """The clean-feature field ``F``.

    Attributes:
        kind: ``"hash"`` (hash encoding + MLP ``enc -> C * hidden_ratio -> C``, the reference) or ``"grid"``
            (a dense ``C``-channel bilinear grid whose nodes include the full view's patch centres; linear in
            its parameters, so it admits the closed-form initial solve of the default preset).
        hash: encoding settings for ``kind="hash"``.
        hidden_ratio: MLP hidden width as a fraction of ``C`` (reference: 1/2).
        grid_factor: for ``kind="grid"``, nodes per full-view patch spacing (1: one node per patch centre).
    """

    kind: str = "hash"
    hash: HashGridConfig = field(default_factory=HashGridConfig)
    hidden_ratio: float = 0.5
    grid_factor: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("hash", "grid"):
            raise ValueError(f"FieldConfig.kind must be 'hash' or 'grid', got {self.kind!r}.")
        if self.grid_factor < 1:
            raise ValueError(f"FieldConfig.grid_factor must be >= 1, got {self.grid_factor}.")


class HashField(nn.Module):
    """``F = MLP(HashGrid(x))``, the DVT reference field."""

    linear = False

    def __init__(self, config: FieldConfig, channels: int, generators: Sequence[torch.Generator]):
        super().__init__()
        self.encoding = HashGrid(config.hash, generators)
        hidden = max(1, int(round(channels * config.hidden_ratio)))
        self.mlp = BatchedMLP((self.encoding.out_dim, hidden, channels), generators)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encoding(coords))


class GridField(BatchedGrid):
    """``F`` as a dense bilinear grid whose nodes land on the full view's patch centres (every
    ``grid_factor``-th node), so ``F`` on the full grid is read off exactly."""

    linear = True

    def __init__(self, config: FieldConfig, channels: int, generators: Sequence[torch.Generator],
                 full_coords: torch.Tensor, device: torch.device | str | None = None):
        k = config.grid_factor
        gh, gw = full_coords.shape[:2]
        span = ((float(full_coords[0, 0, 0]), float(full_coords[0, -1, 0])),
                (float(full_coords[0, 0, 1]), float(full_coords[-1, 0, 1])))
        super().__init__(channels, (k * (gh - 1) + 1, k * (gw - 1) + 1), generators, span=span, device=device)


def create_field(config: FieldConfig, channels: int, generators: Sequence[torch.Generator],
                 full_coords: torch.Tensor, device: torch.device | str | None = None) -> nn.Module:
    """Build ``F`` for ``len(generators)`` images of ``channels`` features.

    ``full_coords`` is the full view's ``(gh, gw, 2)`` patch-centre grid (used by ``kind="grid"``). ``device``:
    where a grid ``F``'s zero start is made (a hash ``F``'s random start is drawn on the CPU; move it after).
    """
    if config.kind == "hash":
        return HashField(config, channels, generators)
    return GridField(config, channels, generators, full_coords, device=device)


class GridInterp:
    """Bilinear interpolation of a grid ``F`` at fixed tokens, as a sparse ``(B * N) x (B * R)`` matrix ``W``
    (four weights a row): ``F(x) = W @ nodes``, and the gradient (or a splat) is ``W^T @ values``.

    The forward is one ``embedding_bag`` over channels-last nodes and the transpose a CSR product, both far
    cheaper on a CPU than ``grid_sample`` over ``C`` channel planes and its scattering backward. The weights
    are those of ``grid_sample(align_corners=True, padding_mode="border")``, the grid's own sampling.
    """

    def __init__(self, grid: BatchedGrid, coords: torch.Tensor):
        self.idx, self.w = bilinear_weights(grid, coords)  # (B, N, 4)
        self.rh, self.rw = grid.grid.shape[-2:]
        b, n, _ = self.idx.shape
        offs = (torch.arange(b, device=coords.device) * self.rh * self.rw)[:, None, None]
        self._flat_idx = (self.idx + offs).reshape(b * n, 4)
        self._flat_w = self.w.reshape(b * n, 4).contiguous()
        self._t: torch.Tensor | None = None

    @property
    def transpose(self) -> torch.Tensor:
        """``W^T`` as a CSR matrix ``(B * R, B * N)`` (built on first use)."""
        if self._t is None:
            bn = self._flat_idx.shape[0]
            rows = self._flat_idx.reshape(-1)
            cols = torch.arange(bn, device=rows.device).repeat_interleave(4)
            b = self.idx.shape[0]
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), self._flat_w.reshape(-1),
                                              (b * self.rh * self.rw, bn), check_invariants=False)
                self._t = coo.coalesce().to_sparse_csr()
        return self._t

    def apply(self, flat: torch.Tensor) -> torch.Tensor:
        """``W @ flat`` for channels-last nodes ``flat (B * R, C)``: ``(B, N, C)`` (no gradient)."""
        b, n, _ = self.idx.shape
        out = F.embedding_bag(self._flat_idx, flat, per_sample_weights=self._flat_w.to(flat.dtype), mode="sum")
        return out.view(b, n, -1)

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """``W^T @ values`` for ``values (B, N, K)``: ``(B * R, K)``."""
        return (self.transpose @ values.reshape(-1, values.shape[-1]).float())

    def __call__(self, grid: torch.Tensor) -> torch.Tensor:
        """``F`` at the tokens from the ``(B, C, H, W)`` node parameter, differentiable: ``(B, N, C)`` fp32."""
        b, c = grid.shape[:2]
        flat = grid.float().flatten(2).transpose(1, 2).reshape(b * self.rh * self.rw, c)
        return _InterpFn.apply(flat, self)


class _InterpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, interp: GridInterp) -> torch.Tensor:
        ctx.interp = interp
        with torch.autocast(flat.device.type, enabled=False):
            return interp.apply(flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return ctx.interp.splat(grad), None


def bilinear_weights(grid: BatchedGrid, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat node indices and weights ``(B, N, 4)`` of ``grid_sample(align_corners=True, border)``."""
    rh, rw = grid.grid.shape[-2:]
    unit = (grid.to_unit(coords.float()) + 1) / 2
    px = (unit[..., 0] * (rw - 1)).clamp(0, rw - 1)
    py = (unit[..., 1] * (rh - 1)).clamp(0, rh - 1)
    x0, y0 = px.floor().clamp(max=max(rw - 2, 0)), py.floor().clamp(max=max(rh - 2, 0))
    fx, fy = px - x0, py - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=rw - 1), (y0 + 1).clamp(max=rh - 1)
    idx = torch.stack([y0 * rw + x0, y0 * rw + x1, y1 * rw + x0, y1 * rw + x1], -1)
    w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    return idx, w
