"""MIC (ApproxMaxMI) against published values, and the paper's feature-vs-position measure on known maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.eval.mic import MineConfig, characteristic_matrix, mic, mine_stats
from pipeline.eval.position_mic import PositionMICConfig, position_mic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

X = np.linspace(0, 1, 1000)


def _stats(x, y) -> dict:
    return mine_stats(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64))


def test_published_minepy_example():
    """minepy's documented example (alpha 0.6, c 15): y = sin(10 pi x) + x, then with uniform noise (seed 0)."""
    y = np.sin(10 * np.pi * X) + X
    clean = _stats(X, y)
    assert clean["mic"] == pytest.approx(1.0, abs=1e-9)
    assert clean["mas"] == pytest.approx(0.726071574374, abs=1e-9)
    assert clean["mcn"] == pytest.approx(4.58496250072, abs=1e-9)
    np.random.seed(0)
    noisy = _stats(X, y + np.random.uniform(-1, 1, X.shape[0]))
    assert noisy["mic"] == pytest.approx(0.505716693417, abs=1e-9)
    assert noisy["mas"] == pytest.approx(0.365399904262, abs=1e-9)
    assert noisy["mcn"] == pytest.approx(5.95419631039, abs=1e-9)


@pytest.mark.parametrize("name, x, y, expect", [
    ("linear", X, X, {"mic": 1.0, "mas": 0.0, "mcn": 2.0}),
    ("exponential", np.linspace(0, 10, 1000), 2 ** np.linspace(0, 10, 1000), {"mic": 1.0, "mas": 0.0, "mcn": 2.0}),
    ("sine", X, np.sin(8 * np.pi * X), {"mic": 1.0, "mas": 0.875, "mcn": 4.0}),
    ("constant", X, np.zeros(1000), {"mic": 0.0, "mas": 0.0, "mcn": 2.0}),
])
def test_noiseless_relations_match_minepy_tests(name, x, y, expect):
    """The cases of minepy's own test suite (its tolerances: 4 decimals, 3 for the sine's MAS)."""
    got = _stats(x, y)
    for key, value in expect.items():
        assert got[key] == pytest.approx(value, abs=1e-3 if key == "mas" else 1e-4), (name, key, got)


def test_independent_noise_is_near_zero_and_shrinks_with_n():
    g = torch.Generator().manual_seed(3)
    small = mic(torch.rand(8, 200, generator=g), torch.rand(8, 200, generator=g))
    large = mic(torch.rand(8, 2000, generator=g), torch.rand(8, 2000, generator=g))
    assert float(small.mean()) < 0.3 and float(large.mean()) < 0.15
    assert float(large.mean()) < float(small.mean())


def test_batched_equals_one_pair_at_a_time_and_is_symmetric():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(300, generator=g)
    ys = torch.stack([x ** 2 + 0.1 * torch.randn(300, generator=g), torch.randn(300, generator=g),
                      torch.round(4 * x) / 4])  # the last has ties (5 values)
    batch = mic(x, ys)
    one = torch.stack([mic(x, y[None])[0] for y in ys])
    assert torch.allclose(batch, one, atol=1e-12)
    swapped = torch.stack([mic(y, x[None])[0] for y in ys])
    assert torch.allclose(batch, swapped, atol=1e-12)
    assert batch[0] > 0.5 > batch[1] and batch[2] > 0.95  # a noiseless step function of unequal steps


def test_characteristic_matrix_respects_the_budget():
    mat = characteristic_matrix(torch.rand(500), torch.rand(1, 500), MineConfig(alpha=0.6))[0]
    budget = 500 ** 0.6
    a, b = torch.meshgrid(torch.arange(mat.shape[0]), torch.arange(mat.shape[1]), indexing="ij")
    defined = torch.isfinite(mat)
    assert bool(defined.any())
    assert bool(((a * b)[defined] <= budget).all()) and bool(((a >= 2) & (b >= 2))[defined].all())
    assert bool((mat[defined] >= 0).all() and (mat[defined] <= 1 + 1e-9).all())
    assert float(mic(torch.rand(500), torch.rand(1, 500), MineConfig(double=False))[0]) < 0.3
    with pytest.raises(ValueError, match="NaN"):
        mic(torch.tensor([0.0, float("nan"), 1.0, 2.0]), torch.rand(1, 4))


def test_position_mic_positional_channel_near_one_position_free_near_floor():
    g = torch.Generator().manual_seed(0)
    grid = 16
    ii, jj = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    free = torch.randn(3, grid, grid, 6, generator=g)
    positional = free.clone()
    positional[..., 2] = torch.cos(jj / 2.5)  # a function of x (not monotone)
    positional[..., 4] = (ii - 7.5) ** 2  # a function of y
    got = position_mic(positional)
    assert got["mic_x"] == pytest.approx(1.0, abs=1e-6) and got["mic_y"] == pytest.approx(1.0, abs=1e-6)
    assert got["per_image"][0]["channel_x"] == 2 and got["per_image"][0]["channel_y"] == 4
    floor = position_mic(free)
    assert floor["mic"] < 0.35, floor  # independent samples: the finite-n floor of MIC (n = 256)
    only_x = free.clone()
    only_x[..., 1] = jj
    half = position_mic(only_x)
    assert half["mic_x"] == pytest.approx(1.0, abs=1e-6) and half["mic_y"] < 0.35
    assert half["mic"] == pytest.approx((half["mic_x"] + half["mic_y"]) / 2)
    assert half["budget"] == pytest.approx(256 ** 0.6) and half["images"] == 3


def test_position_mic_options_and_errors():
    maps = torch.randn(5, 8, 8, 10, generator=torch.Generator().manual_seed(1))
    got = position_mic(maps, PositionMICConfig(images=2, channels=4, seed=0))
    assert got["images"] == 2 and got["channels"] == 4 and got["of_channels"] == 10
    assert math.isfinite(got["mic"])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        position_mic(maps[0])
