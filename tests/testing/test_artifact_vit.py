"""The test ViT with a real positional artifact: strong where it should be, absent without its pattern, the same
weights in every process, and usable wherever a `module:factory` backbone is."""

import torch
import torch.nn.functional as F

from pipeline.vit.backbone import create_backbone
from pipeline.analysis.metrics import grid_energy, positional_energy
from pipeline.analysis.feature_maps import load_image

SMALL = "pipeline.testing.artifact_vit:create_small"


def test_its_features_carry_a_strong_grid_artifact_that_the_reference_lacks(sample_images, one_torch_thread):
    photos = torch.stack([load_image(str(p), 128) for p in sample_images])
    vit = create_backbone(SMALL, weights="none")
    reference = create_backbone(f"{SMALL}_reference", weights="none")
    with torch.no_grad():
        raw, truth = vit.features(photos), reference.features(photos)
    assert raw.shape == (len(sample_images), 8, 8, 192)
    assert positional_energy(raw) >= 0.3 and positional_energy(truth) < 0.05
    assert grid_energy(raw) > grid_energy(truth) + 0.1  # periods of 2-4 patches
    assert 0.6 < float(F.cosine_similarity(raw, truth, dim=-1).mean()) < 0.95  # an artifact, not other features


def test_every_build_has_the_same_weights_and_loads_a_file(tmp_path, one_torch_thread):
    from safetensors.torch import save_file

    torch.manual_seed(123)
    a = create_backbone(SMALL, weights="none")
    torch.manual_seed(456)
    b = create_backbone(SMALL, weights="none")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.01)
    path = str(tmp_path / "moved.safetensors")
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, path)
    c = create_backbone(SMALL, weights=path)
    pixels = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(c.features(pixels), b.features(pixels))
        assert not torch.allclose(c.features(pixels), a.features(pixels))
