"""Feature pictures: PCA colours, K-means, panel PNGs of the right size that are not blank, and `dvt show`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.analysis.panels import PanelConfig, PanelRow, kmeans, kmeans_maps, norm_maps, pca_rgb, render_panels

GH = GW = 8
C = 12
CELL = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kmeans_finds_separated_blobs():
    g = _gen(0)
    centres = torch.randn(4, C, generator=g) * 10
    truth = torch.arange(200) % 4
    tokens = centres[truth] + 0.1 * torch.randn(200, C, generator=g)
    labels, cents = kmeans(tokens, 4, seed=1)
    assert cents.shape == (4, C)
    # a perfect clustering is a relabelling of the truth
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4


def test_kmeans_maps_match_reference_labels():
    g = _gen(1)
    base = torch.randn(3, C, generator=g) * 5
    idx = torch.randint(3, (2, GH, GW), generator=g)
    maps = [base[i] + 0.05 * torch.randn(GH, GW, C, generator=g) for i in idx]
    ref = kmeans_maps(maps, 3, seed=0)
    shifted = [m * 2 + 1 for m in maps]  # same clusters, other features: colours must follow the reference
    again = kmeans_maps(shifted, 3, seed=5, reference=ref)
    assert all(np.array_equal(a, r) for a, r in zip(again, ref))


def test_pca_rgb_shared_basis():
    g = _gen(2)
    a = torch.randn(GH, GW, C, generator=g)
    rgb = pca_rgb([a, a + 100.0 * torch.nn.functional.normalize(torch.ones(C), dim=0)])
    assert rgb[0].shape == (GH, GW, 3) and 0 <= rgb[0].min() and rgb[0].max() <= 1
    # one basis across both maps: the offset image lands at the far end of the first component
    assert abs(rgb[1][..., 0].mean() - rgb[0][..., 0].mean()) > 0.8
    assert norm_maps([a])[0].shape == (GH, GW)


def _rows(n: int, artifact: bool = True) -> list[PanelRow]:
    g = _gen(3)
    rows = []
    for i in range(n):
        clean = torch.randn(GH, GW, C, generator=g)
        art = torch.randn(GH, GW, C, generator=g)
        rows.append(PanelRow(raw=clean + art, clean=clean, artifact=art if artifact else None,
                             image=torch.rand(3, 64, 64, generator=g), title=f"image {i}"))
    return rows


def _not_blank(path) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    assert a.std() > 20, "the picture is (nearly) one colour"
    return a


def test_render_panels_size_and_content(tmp_path):
    path = tmp_path / "grid.png"
    size = render_panels(_rows(2), path, PanelConfig(cell=CELL, header=20), title="test")
    img = Image.open(path)
    assert size == img.size == (9 * CELL, 2 * 20 + 2 * CELL)
    a = _not_blank(path)
    # every panel has content: the centre of each cell differs from the white background somewhere
    for r in range(2):
        for c in range(9):
            y0, x0 = 40 + r * CELL + 8, c * CELL + 8
            cell = a[y0:y0 + CELL - 16, x0:x0 + CELL - 16]
            assert cell.std() > 1 or cell.mean() < 250, (r, c)


def test_render_panels_without_denoised_or_artifact(tmp_path):
    raw_only = [PanelRow(raw=r.raw) for r in _rows(2)]
    assert render_panels(raw_only, tmp_path / "raw.png", PanelConfig(cell=CELL, header=20))[0] == 3 * CELL
    no_art = _rows(1, artifact=False)
    assert render_panels(no_art, tmp_path / "clean.png", PanelConfig(cell=CELL, header=20))[0] == 7 * CELL
    with pytest.raises(ValueError, match="no rows"):
        render_panels([], tmp_path / "none.png")


def test_show_job_from_store(tmp_path, sample_images):
    from jobs.cli import main
    from pipeline.store import FeatureStore, StoreLayout

    uris = [str(p) for p in sample_images[:3]]
    layout = StoreLayout(backbone="t", block=0, input_size=(64, 64), patch_size=8, stride=8, grid=(GH, GW),
                         channels=C, arrays=("raw", "clean", "artifact"))
    url = str(tmp_path / "s.zarr")
    store = FeatureStore.create(url, layout, uris)
    rows = _rows(3)
    store.write_unit([{"image_id": i, "uri": u} for i, u in enumerate(uris)],
                     {"raw": torch.stack([r.raw for r in rows]), "clean": torch.stack([r.clean for r in rows]),
                      "artifact": torch.stack([r.artifact for r in rows])})
    out = tmp_path / "show"
    assert main(["show", "--store", url, "--rows", "2,0", "--out", str(out), "--cell", str(CELL),
                 "--per-image"]) == 0
    grid = Image.open(out / "features.png")
    assert grid.size == (9 * CELL, 2 * 28 + 2 * CELL)
    _not_blank(out / "features.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(["features.png", "0_astronaut.png", "2_chelsea.png"])
    assert main(["show", "--out", str(out)]) == 1  # neither --store nor --images: one error line, exit 1


@pytest.mark.slow
def test_show_job_from_images(tmp_path, sample_images):
    from jobs.cli import main

    out = tmp_path / "show"
    assert main(["show", "--images", str(sample_images[0]), "--model", "tests.custom_backbone:create",
                 "--weights", "none", "--input-size", "64", "--out", str(out), "--cell", str(CELL)]) == 0
    assert Image.open(out / "features.png").size == (9 * CELL, 2 * 28 + CELL)
    _not_blank(out / "features.png")


def test_eval_and_show_with_a_stage2_denoiser(tmp_path, sample_images):
    """A denoiser file gives the stage-2 source (skipped until pipeline.stage2.denoiser is part of the package)."""
    import json

    denoiser = pytest.importorskip("pipeline.stage2.denoiser")
    from pipeline.vit.backbone import create_backbone
    from jobs.cli import main
    from pipeline.store import StoreLayout

    torch.manual_seed(0)
    backbone = create_backbone("tests.custom_backbone:create", weights="none")
    cfg = denoiser.DenoiserConfig(channels=backbone.embed_dim, num_heads=2, pos_grid=(GH, GW))
    path = str(tmp_path / "denoiser.safetensors")
    denoiser.save_denoiser(path, denoiser.Denoiser(cfg),
                           denoiser.DenoiserSpec.from_layout(StoreLayout.from_backbone(backbone, 64), cfg))
    common = ["--images", str(sample_images[0].parent), "--limit", "2", "--model", "tests.custom_backbone:create",
              "--weights", "none", "--input-size", "64", "--denoiser", path]
    assert main(["eval", *common, "--pairs", "1", "--no-information", "--out", str(tmp_path / "r")]) == 0
    art = json.loads((tmp_path / "r" / "report.json").read_text())["measures"]["extras"]["results"]
    assert set(art) == {"raw", "stage-2"} and "cross_view_consistency" in art["stage-2"]
    assert main(["show", *common, "--out", str(tmp_path / "s"), "--cell", str(CELL)]) == 0
    assert Image.open(tmp_path / "s" / "features.png").size == (7 * CELL, 2 * 28 + 2 * CELL)
