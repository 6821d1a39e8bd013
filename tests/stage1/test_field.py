"""The batched field blocks: exact interpolation, per-image independence, CPU/autocast paths."""

from __future__ import annotations

import pytest
import torch

from pipeline.stage1.field import BatchedGrid, BatchedMLP, FieldConfig, HashGrid, HashGridConfig, create_field


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_hash_grid_levels_match_reference_layout():
    enc = HashGrid(HashGridConfig(), gens(0))
    assert enc.out_dim == 128
    assert enc.res[0] == 17 and enc.res[-1] == 1025  # scales 15 .. 1023, geometric
    assert bool(enc.dense[:-1].all()) and not enc.dense[-1]  # only the 1024 level is hashed in 2-D
    small = HashGrid(HashGridConfig(levels=4, log2_table_size=10, base_resolution=8, max_resolution=256), gens(0))
    assert small.dense.tolist() == [True, True, False, False]
    assert small.table.shape == (1, int(small.sizes.sum()), 8)
    assert int(small.sizes.max()) == 1024


def test_hash_grid_is_bilinear_on_a_dense_level():
    enc = HashGrid(HashGridConfig(levels=1, base_resolution=9, max_resolution=9, features_per_level=2), gens(0))
    res = int(enc.res[0])
    with torch.no_grad():  # table value = (x index, y index): bilinear interpolation must give pos - 0.5
        ii = torch.arange(res * res)
        enc.table[0] = torch.stack([ii % res, ii // res], -1).float()
    xy = torch.rand(1, 100, 2) * 0.9 + 0.05
    out = enc(xy)
    expect = xy * enc.scales[0] + 0.5
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=0)


def test_hash_grid_batch_slices_are_independent():
    both = HashGrid(HashGridConfig(levels=4, log2_table_size=12), gens(1, 2))
    one = HashGrid(HashGridConfig(levels=4, log2_table_size=12), gens(2))
    torch.testing.assert_close(both.table[1], one.table[0])
    xy = torch.rand(2, 50, 2)
    torch.testing.assert_close(both(xy)[1], one(xy[1:])[0])
    both(xy)[0].sum().backward()  # image 0's loss never touches image 1's table
    assert both.table.grad[1].abs().max() == 0 and both.table.grad[0].abs().max() > 0


def test_batched_mlp_matches_per_image_linear():
    mlp = BatchedMLP((6, 5, 3), gens(0, 1))
    x = torch.randn(2, 7, 6)
    y = mlp(x)
    for b in range(2):
        h = torch.relu(x[b] @ mlp.weights[0][b] + mlp.biases[0][b])
        torch.testing.assert_close(y[b], h @ mlp.weights[1][b] + mlp.biases[1][b])


def test_batched_grid_nodes_sit_on_span_ends():
    g = BatchedGrid(2, (3, 4), gens(0), span=((0.1, 0.7), (0.2, 0.8)), init_std=1.0)
    xs, ys = torch.linspace(0.1, 0.7, 4), torch.linspace(0.2, 0.8, 3)
    xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, -1, 2)
    torch.testing.assert_close(g(xy)[0], g.grid[0].flatten(1).T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["hash", "grid"])
def test_field_runs_fp32_and_autocast(kind):
    cfg = FieldConfig(kind=kind, hash=HashGridConfig(levels=4, log2_table_size=12))
    full = torch.stack(torch.meshgrid(torch.linspace(0.05, 0.95, 5), torch.linspace(0.05, 0.95, 5),
                                      indexing="xy"), -1)
    f = create_field(cfg, 16, gens(0, 1), full)
    xy = torch.rand(2, 32, 2)
    out = f(xy)
    assert out.shape == (2, 32, 16) and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = f(xy)
    assert torch.isfinite(low).all()
    low.float().square().mean().backward()
    assert all(p.grad is not None for p in f.parameters())
