import math

import pytest
import torch

from pipeline.vit.views import ViewConfig, grid_shape, make_views, patch_coords, render_views, sample_boxes, view_generator


def position_image(size: int) -> torch.Tensor:
    """An image whose channels 0 and 1 hold the global (x, y) of each pixel centre; channel 2 is constant."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([x, y, torch.full_like(x, 0.5)])


def patch_means(views: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Mean of each (possibly overlapping) patch: (V, gh, gw, 3)."""
    pooled = torch.nn.functional.avg_pool2d(views, kernel_size=patch, stride=stride)
    return pooled.permute(0, 2, 3, 1)


@pytest.mark.parametrize("patch,stride", [(14, 14), (16, 16), (14, 7)])
def test_patch_coordinates_match_pixel_positions(patch, stride):
    size = patch * 4
    views = make_views(position_image(1024), ViewConfig(num_views=32, flip_prob=0.5), size, patch, stride,
                       image_id=3, seed=1)
    assert views.flips.any() and not views.flips[1:].all()
    means = patch_means(views.images, patch, stride)
    assert views.coords.shape == (33, *grid_shape(size, patch, stride), 2)
    torch.testing.assert_close(means[..., :2], views.coords, atol=1e-4, rtol=0)


def test_full_view_is_first_and_exact():
    views = make_views(position_image(56), ViewConfig(num_views=4), 56, 14, image_id=0, seed=0)
    torch.testing.assert_close(views.boxes[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert not views.flips[0]
    torch.testing.assert_close(views.images[0], position_image(56), atol=1e-6, rtol=0)
    centres = (torch.arange(4) * 14 + 7) / 56
    torch.testing.assert_close(views.coords[0, 0, :, 0], centres)
    torch.testing.assert_close(views.coords[0, :, 0, 1], centres)


def test_flip_mirrors_pixels_and_coordinates():
    image = torch.rand(3, 64, 64)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.4]] * 2)
    flips = torch.tensor([False, True])
    v = render_views(image, boxes, flips, 32)
    torch.testing.assert_close(v[1], v[0].flip(-1))
    c = patch_coords(boxes, flips, 32, 8)
    torch.testing.assert_close(c[1], c[0].flip(1))


def test_same_image_and_seed_give_same_views():
    image = torch.rand(3, 64, 64)
    cfg = ViewConfig(num_views=16)
    a = make_views(image, cfg, 28, 14, image_id=7, seed=42)
    b = make_views(image, cfg, 28, 14, image_id=7, seed=42)
    torch.manual_seed(123)  # the global RNG must not matter
    c = make_views(image, cfg, 28, 14, image_id=7, seed=42)
    for other in (b, c):
        assert torch.equal(a.boxes, other.boxes) and torch.equal(a.flips, other.flips)
        assert torch.equal(a.images, other.images)
    assert not torch.equal(a.boxes, make_views(image, cfg, 28, 14, image_id=8, seed=42).boxes)
    assert not torch.equal(a.boxes, make_views(image, cfg, 28, 14, image_id=7, seed=43).boxes)


def test_boxes_follow_scale_ratio_and_flip_probability():
    cfg = ViewConfig(num_views=4000, scale=(0.1, 0.5), ratio=(3 / 4, 4 / 3), flip_prob=0.5)
    boxes, flips = sample_boxes(cfg.num_views, cfg, view_generator(0, 0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 0.5 + 1e-5
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert abs(flips.float().mean().item() - 0.5) < 0.04
    assert abs(area.mean().item() - 0.3) < 0.02  # uniform in [0.1, 0.5]


def test_near_full_views_are_the_last_boxes_at_their_own_scale():
    cfg = ViewConfig(num_views=1000, scale=(0.3, 0.7), near_full_share=0.4, near_full_scale=(0.9, 1.0))
    assert cfg.near_full_views == 400
    boxes, flips = sample_boxes(cfg.num_views, cfg, view_generator(0, 0))
    area = boxes[:, 2] * boxes[:, 3]
    assert boxes.shape == (1000, 4) and flips.shape == (1000,)
    assert area[:600].min() >= 0.3 - 1e-5 and area[:600].max() <= 0.7 + 1e-5
    # near the full area most aspect ratios do not fit: redrawn, and after ten tries shrunk to fit (never below
    # sqrt(0.9 * 3/4) of the area for ratios within 3/4-4/3)
    assert area[600:].min() >= 0.82 and area[600:].max() <= 1.0 + 1e-5
    assert (area[600:] >= 0.9 - 1e-5).float().mean() > 0.9
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    assert 0.4 < flips[600:].float().mean() < 0.6


def test_bad_sizes_and_configs_fail_clearly():
    with pytest.raises(ValueError, match="does not fit patch 14"):
        grid_shape(100, 14)
    with pytest.raises(ValueError, match="scale"):
        ViewConfig(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="near_full_scale"):
        ViewConfig(near_full_scale=(0.9, 1.2))
    with pytest.raises(ValueError, match="one image"):
        render_views(torch.rand(1, 3, 8, 8), torch.zeros(1, 4), torch.zeros(1, dtype=torch.bool), 8)
    assert grid_shape((28, 42), 14) == (2, 3)
    assert math.prod(grid_shape(518, 14)) == 37 * 37
