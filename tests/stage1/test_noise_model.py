"""The noise model ``raw = F(x) + G(p) + h(raw)``: the gauge, the grid operator of the closed-form solve, and the
closed-form solve on a problem with a known answer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.stage1.field import BatchedGrid, FieldConfig, GridInterp
from pipeline.stage1.noise_model import NoiseModel


def _coords(g: int) -> torch.Tensor:
    c = (torch.arange(g) + 0.5) / g
    return torch.stack(torch.meshgrid(c, c, indexing="xy"), -1)  # (g, g, 2): x, y


def _model(kind: str, b: int = 2, c: int = 6, g: int = 5) -> NoiseModel:
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    return NoiseModel(FieldConfig(kind=kind, grid_factor=2), c, _coords(g), _coords(g), gens, g_init_std=0.3)


def test_fix_gauge_moves_g_mean_into_f_and_changes_no_prediction():
    for kind in ("grid", "hash"):
        model = _model(kind)
        coords = torch.rand(2, 4 * 25, 2)
        before = model.explain(coords.shape[1], coords, None)
        moved = model.fix_gauge()
        after = model.explain(coords.shape[1], coords, None)
        assert moved.abs().max() > 0.01  # G started with a mean of its own
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        assert model.artifact.grid.mean((2, 3)).abs().max() < 1e-6  # G: zero mean per channel


def test_grid_interp_is_grid_sample_and_its_transpose_is_the_adjoint():
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    grid = BatchedGrid(4, (6, 7), gens, span=((0.1, 0.9), (0.05, 0.95)), init_std=1.0)
    coords = torch.rand(3, 50, 2) * 1.2 - 0.1  # some outside the span: border values
    interp = GridInterp(grid, coords)
    torch.testing.assert_close(interp(grid.grid), grid(coords), atol=1e-5, rtol=1e-5)
    flat = torch.randn(3 * 6 * 7, 4)
    values = torch.randn(3, 50, 4)
    lhs = (interp.apply(flat) * values).sum()
    rhs = (flat * interp.splat(values)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-3, rtol=1e-4)
    # the autograd path uses the same transpose
    nodes = grid.grid.detach().clone().requires_grad_(True)
    interp(nodes).mul(values).sum().backward()
    expected = torch.autograd.grad(grid(coords).mul(values).sum(), grid.grid)[0]
    torch.testing.assert_close(nodes.grad, expected, atol=1e-4, rtol=1e-4)


def test_closed_form_solve_recovers_a_known_f_and_g():
    """Views at several shifts of a smooth image plus one fixed G: the solve separates them up to the gauge."""
    torch.manual_seed(0)
    b, c, g, views = 1, 3, 6, 12
    model = _model("grid", b=b, c=c, g=g)
    model.artifact.grid.data.zero_()
    true_g = torch.randn(c, g, g) * 0.5
    true_g -= true_g.mean((1, 2), keepdim=True)  # the gauge: G has zero mean

    def clean(xy: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sin(3 * xy[..., 0]), torch.cos(2 * xy[..., 1]), xy[..., 0] * xy[..., 1] + 1], -1)

    full = _coords(g)
    xy = [full.reshape(-1, 2)]
    for v in range(1, views):
        scale = 0.5 + 0.4 * torch.rand(())
        off = torch.rand(2) * (1 - scale)
        xy.append((full * scale + off).reshape(-1, 2))
    coords = torch.cat(xy)[None]  # (1, V * P, 2)
    pos_g = true_g.flatten(1).T.repeat(views, 1)  # (V * P, C)
    raw = (clean(coords[0]) + pos_g)[None]
    model.solve_linear(raw, coords, views, iters=400, full_weight=1.0)
    model.fix_gauge()
    got_g = model.artifact_tokens()[0]
    err_g = (got_g - true_g.flatten(1).T).norm() / true_g.norm()
    got_f = model.field(full.reshape(1, -1, 2)).float()[0]
    err_f = (got_f - clean(full.reshape(-1, 2))).norm() / clean(full.reshape(-1, 2)).norm()
    assert err_g < 0.02 and err_f < 0.02, (float(err_g), float(err_f))
    assert F.cosine_similarity(got_f, clean(full.reshape(-1, 2)), dim=-1).min() > 0.99


def test_a_full_view_weight_per_image_is_each_image_solved_with_its_own():
    """``full_weight`` may be one number per image: image i's fit is the one a batch of it alone gets with
    ``full_weight[i]`` (the images of a batch never mix), and a weight of W for every image is the number W."""
    b, c, g, views = 3, 4, 5, 6
    torch.manual_seed(1)
    coords = torch.rand(b, views * g * g, 2)
    coords[:, : g * g] = _coords(g).reshape(1, -1, 2)  # view 0 is the full view
    raw = torch.randn(b, views * g * g, c)
    weights = torch.tensor([1.0, 7.5, 40.0])

    def fit(model: NoiseModel, rows: slice, weight) -> torch.Tensor:
        model.field.grid.data.zero_()
        model.artifact.grid.data.zero_()
        model.solve_linear(raw[rows], coords[rows], views, iters=15, full_weight=weight, high_norm=3.0, smooth=0.03)
        return torch.cat([model.field.grid.data.flatten(1), model.artifact.grid.data.flatten(1)], 1)

    batch = fit(_model("grid", b=b, c=c, g=g), slice(0, b), weights)
    for i in range(b):
        alone = fit(_model("grid", b=1, c=c, g=g), slice(i, i + 1), float(weights[i]))
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    same = fit(_model("grid", b=b, c=c, g=g), slice(0, b), torch.full((b,), 7.5))
    torch.testing.assert_close(same, fit(_model("grid", b=b, c=c, g=g), slice(0, b), 7.5))
    unweighted = fit(_model("grid", b=1, c=c, g=g), slice(2, 3), 1.0)
    assert (batch[2:] - unweighted).abs().max() > 1e-3  # the weight does change the fit
