import socket

import pytest
import torch
from safetensors.torch import save_file

from pipeline.vit.backbone import EXAMPLE_MODELS, BackboneError, create_backbone, load_state_dict

SMALL = 64  # input size for family tests: 4x4 (patch 16) or 4x4 + margin (patch 14 -> 56)


@pytest.mark.parametrize("family", sorted(EXAMPLE_MODELS))
def test_every_family_builds_and_yields_grid_features(family):
    name = EXAMPLE_MODELS[family]
    backbone = create_backbone(name, weights="none", img_size=112 if "patch14" in name else 128, block=-2)
    p = backbone.patch_size
    x = torch.rand(2, 3, 4 * p, 6 * p)  # not the build size: position embeddings are interpolated
    with torch.no_grad():
        feats = backbone.features(x)
    assert feats.shape == (2, 4, 6, backbone.embed_dim)
    assert torch.isfinite(feats).all()
    assert backbone.block == backbone.num_blocks - 2
    assert backbone.num_prefix_tokens == (5 if "reg4" in name else 1)
    assert len(backbone.mean) == 3 and len(backbone.std) == 3


def test_last_block_matches_timm_forward_features():
    backbone = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)
    x = torch.rand(1, 3, 56, 70)
    with torch.no_grad():
        ours = backbone.features(x)
        ref = backbone.model.forward_features(backbone.normalize(x))[:, backbone.num_prefix_tokens:]
    torch.testing.assert_close(ours, ref.reshape(1, 4, 5, -1))
    with torch.no_grad():
        earlier = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56, block=3).features(x)
    assert earlier.shape == ours.shape


def test_registers_are_dropped_from_patch_grid():
    backbone = create_backbone("vit_small_patch14_reg4_dinov2", weights="none", img_size=56)
    with torch.no_grad():
        assert backbone.features(torch.rand(1, 3, 56, 56)).shape == (1, 4, 4, 384)


def test_smaller_stride_gives_overlapping_patches():
    backbone = create_backbone("vit_small_patch16_224", weights="none", img_size=64, stride=8)
    assert backbone.grid(64) == (7, 7)
    with torch.no_grad():
        assert backbone.features(torch.rand(1, 3, 64, 64)).shape == (1, 7, 7, 384)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "wrapped"])
def test_local_weights_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    source = create_backbone("deit3_small_patch16_224", weights="none", img_size=64)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "epoch": 3} if fmt == "wrapped" else state, path)
    torch.manual_seed(1)
    loaded = create_backbone("deit3_small_patch16_224", weights=str(path), img_size=64)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), source.features(x))


def test_classification_checkpoints_load_without_their_head(tmp_path):
    import timm

    classifier = timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=64, num_classes=10)
    path = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    backbone = create_backbone("deit3_small_patch16_224", weights=str(path), img_size=64)
    torch.testing.assert_close(backbone.model.blocks[0].attn.qkv.weight, classifier.blocks[0].attn.qkv.weight)


def test_mismatched_weights_fail_with_a_clear_sentence(tmp_path):
    other = create_backbone("vit_small_patch16_224", weights="none", img_size=64)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not match model 'vit_base_patch16_224'.*--model"):
        create_backbone("vit_base_patch16_224", weights=str(path), img_size=64)
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("vit_base_patch16_224", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="Could not read weights file"):
        load_state_dict(tmp_path / "junk.pth")


def test_unknown_model_suggests_names():
    with pytest.raises(BackboneError, match="Unknown model 'vit_smal_patch14_dinov2'.*Did you mean vit_small_patch14_dinov2"):
        create_backbone("vit_smal_patch14_dinov2", weights="none")


def test_hub_download_offline_fails_without_the_network_and_says_what_to_do(monkeypatch):
    tried = []

    def connect(sock, address):
        tried.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(BackboneError, match="--weights /path/to/file.*--weights none"):
        create_backbone("vit_small_patch16_224.augreg_in21k", weights="hub", img_size=64)
    assert tried == [], f"an offline download still tried to connect to {tried}"


def test_input_size_must_fit_patch_grid():
    backbone = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)
    with pytest.raises(BackboneError, match="does not fit patch 14"):
        backbone.features(torch.rand(1, 3, 60, 56))
    with pytest.raises(BackboneError, match="Block 12 does not exist"):
        create_backbone("vit_small_patch14_dinov2", weights="none", block=12)


def test_custom_factory_backbone(tmp_path):
    backbone = create_backbone("tests.custom_backbone:create", weights="none")
    assert (backbone.patch_size, backbone.embed_dim, backbone.mean) == (8, 12, (0.5, 0.5, 0.5))
    x = torch.rand(2, 3, 32, 48)
    assert backbone.features(x).shape == (2, 4, 6, 12)
    path = tmp_path / "custom.pth"
    torch.save(backbone.model.state_dict(), path)
    again = create_backbone("tests.custom_backbone:create", weights=str(path))
    torch.testing.assert_close(again.features(x), backbone.features(x))
    with pytest.raises(BackboneError, match="Cannot import backbone factory"):
        create_backbone("tests.no_such_module:create")


def test_custom_backbone_takes_the_block_and_stride_a_denoiser_records():
    # a denoiser's spec names the block as a non-negative index and the stride explicitly: block 0, stride = patch
    same = create_backbone("tests.custom_backbone:create", weights="none", block=0, stride=8)
    assert (same.block, same.stride, same.num_blocks) == (0, 8, 1)
    for kwargs in ({"block": 1}, {"block": -2}, {"stride": 4}):
        with pytest.raises(BackboneError, match="has one block"):
            create_backbone("tests.custom_backbone:create", weights="none", **kwargs)
