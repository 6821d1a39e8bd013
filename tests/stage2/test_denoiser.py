"""The stage-2 denoiser: architecture, any-grid positional embedding, file export and reload, clear mismatches."""

import json
import struct

import pytest
import torch

from pipeline.vit.backbone import create_backbone
from pipeline.stage2.denoiser import (DenoisedViT, Denoiser, DenoiserConfig, DenoiserMismatchError, DenoiserSpec,
                               load_denoiser, read_spec, save_denoiser)

TINY = "vit_small_patch14_dinov2"


def spec_for(backbone, config: DenoiserConfig, **training) -> DenoiserSpec:
    return DenoiserSpec(denoiser=config, backbone=backbone.name, block=backbone.block, input_size=(56, 56),
                        patch_size=backbone.patch_size, stride=backbone.stride, training=training)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone(TINY, weights="none", img_size=56)


def test_reference_architecture_and_any_grid():
    d = Denoiser(DenoiserConfig(channels=384, pos_grid=(37, 37)))
    block = d.blocks[0]
    assert len(d.blocks) == 1 and block.attn.num_heads == 6 and block.attn.qkv.bias is not None
    assert block.mlp.fc1.out_features == 4 * 384 and d.pos_embed.shape == (1, 37 * 37, 384)
    for grid in [(37, 37), (4, 4), (16, 24)]:
        x = torch.randn(2, *grid, 384)
        assert d(x).shape == x.shape
    assert Denoiser(DenoiserConfig(channels=32, num_blocks=3)).config.num_heads == 1
    assert len(Denoiser(DenoiserConfig(channels=32, num_blocks=3)).blocks) == 3
    with pytest.raises(DenoiserMismatchError, match="expects features"):
        d(torch.randn(1, 4, 4, 768))


def test_prediction_is_the_block_output_of_raw_plus_position():
    """As in the reference: clean = block(raw + pos), no outer residual (the block's skips carry raw)."""
    d = Denoiser(DenoiserConfig(channels=64, pos_grid=(3, 3))).eval()
    raw = torch.randn(1, 3, 3, 64)
    expected = d.blocks(raw.reshape(1, 9, 64) + d.pos_embed).reshape(1, 3, 3, 64)
    torch.testing.assert_close(d(raw), expected)


def test_export_reload_matches_outputs(tmp_path, backbone):
    torch.manual_seed(1)
    denoiser = Denoiser(DenoiserConfig(channels=384, pos_grid=(4, 4))).eval()
    spec = spec_for(backbone, denoiser.config, stores=["s3://b/x.zarr"], num_train=10)
    path = str(tmp_path / "d" / "denoiser.safetensors")
    save_denoiser(path, denoiser, spec)
    loaded, spec2 = load_denoiser(path)
    assert spec2.denoiser == denoiser.config and spec2.training["stores"] == ["s3://b/x.zarr"]
    assert read_spec(path).backbone == TINY and spec2.input_size == (56, 56)
    pixels = torch.rand(2, 3, 56, 56)
    ours = DenoisedViT(backbone, denoiser, spec).features(pixels)
    theirs = DenoisedViT.from_file(path, backbone=backbone).features(pixels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    raw, clean = DenoisedViT.from_file(path, backbone=backbone)(pixels, return_raw=True)
    assert raw.shape == clean.shape == (2, 4, 4, 384) and not torch.allclose(raw, clean)
    # the spec is plain JSON in the safetensors header: readable without this package
    data = (tmp_path / "d" / "denoiser.safetensors").read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    assert json.loads(header["__metadata__"]["dvt_denoiser"])["backbone"] == TINY


def test_from_file_builds_the_named_backbone(tmp_path, backbone):
    denoiser = Denoiser(DenoiserConfig(channels=384, pos_grid=(4, 4)))
    path = str(tmp_path / "denoiser.safetensors")
    save_denoiser(path, denoiser, spec_for(backbone, denoiser.config))
    model = DenoisedViT.from_file(path, weights="none")
    assert model.backbone.name == TINY and model(torch.rand(1, 3, 56, 56)).shape == (1, 4, 4, 384)


def test_denoiser_for_another_backbone_is_refused(tmp_path, backbone):
    denoiser = Denoiser(DenoiserConfig(channels=384, pos_grid=(4, 4)))
    path = str(tmp_path / "denoiser.safetensors")
    save_denoiser(path, denoiser, spec_for(backbone, denoiser.config))
    other = create_backbone("deit3_small_patch16_224", weights="none")  # same width, another model
    with pytest.raises(DenoiserMismatchError, match=r"backbone: denoiser 'vit_small_patch14_dinov2', backbone 'deit3"):
        DenoisedViT.from_file(path, backbone=other)
    narrow = create_backbone("tests.custom_backbone:create", weights="none")
    with pytest.raises(DenoiserMismatchError, match="channels: denoiser 384, backbone 12"):
        DenoisedViT.from_file(path, backbone=narrow)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvt train"):
        load_denoiser(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a DVT denoiser"):
        load_denoiser(str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_spec(str(tmp_path / "junk.safetensors"))
