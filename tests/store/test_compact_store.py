"""Compact stores: int8 codes and PCA coefficients, decoded by every read through FeatureStore."""

import dataclasses

import numpy as np
import pytest
import zarr

from pipeline.store.convert import CompactConfig, convert_store
from pipeline.denoise.job import DenoiseConfig, plan_denoise
from pipeline.runtime.checks import JobConfigError
from pipeline.store import FeatureStore, StoreError, StoreLayout
from pipeline.store import layout as layout_module
from pipeline.store.compact import dequantize, quantize
from pipeline.store.feature_store import read_rows

LAYOUT = StoreLayout(backbone="synthetic", block=0, input_size=(56, 56), patch_size=14, stride=14, grid=(4, 4),
                     channels=32)


def _features(n: int, rank: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0, 1.5, 32)).astype(np.float32)  # channels of very different ranges
    out = {}
    for name in ("raw", "clean"):
        if rank is None:
            x = rng.normal(0, 1, (n, 4, 4, 32)) * scales + rng.normal(0, 3, 32)
        else:
            x = rng.normal(0, 1, (n, 4, 4, rank)) @ rng.normal(0, 1, (rank, 32)) + 0.01 * rng.normal(0, 1, (n, 4, 4, 32))
        out[name] = x.astype(np.float16)
    return out


def _write(url, layout, data):
    n = len(next(iter(data.values())))
    store = FeatureStore.create(url, layout, [f"img{i}.png" for i in range(n)])
    store.write_unit([{"image_id": i} for i in range(n)], data)
    return store.refresh()


def test_int8_round_trip_stays_within_half_a_step_per_channel(tmp_path):
    data = _features(6)
    q, scale, offset = quantize(data["raw"])
    assert q.dtype == np.int8 and scale.shape == (6, 32)
    x = data["raw"].astype(np.float32)
    err = np.abs(dequantize(q, scale, offset) - x)
    span = x.max((1, 2)) - x.min((1, 2))
    assert (err <= span[:, None, None, :] / 508 * 1.001 + 1e-6).all()

    store = _write(str(tmp_path / "int8.zarr"), dataclasses.replace(LAYOUT, compact={"kind": "int8"}), data)
    back = store.get(store.ids())
    assert back["raw"].dtype == np.float16 and back["raw"].shape == (6, 4, 4, 32)
    bound = span[:, None, None, :] / 508 + np.abs(x) * 2 ** -10 + 1e-6  # half a step, then float16 rounding
    assert (np.abs(back["raw"].astype(np.float32) - x) <= bound).all()
    cos = (back["clean"].astype(np.float32) * data["clean"]).sum(-1) / (
        np.linalg.norm(back["clean"].astype(np.float32), axis=-1) * np.linalg.norm(data["clean"].astype(np.float32), axis=-1))
    assert 1 - cos.mean() < 0.005  # the target: < 0.5% relative cosine lost
    assert store.attrs["format_version"] == 2 and store.attrs["compact"] == {"kind": "int8"}
    assert store.zarr_arrays["raw_int8"].nbytes * 2 == LAYOUT.image_nbytes * 6  # half the bytes of float16
    # every reader: pairs for training, the Ray Data read step
    raw, clean = next(store.iter_pairs(batch_size=6))
    np.testing.assert_array_equal(raw, back["raw"])
    batch = read_rows({"image_id": np.arange(3)}, url=store.url, arrays=("clean",), options="{}")
    np.testing.assert_array_equal(batch["clean"], back["clean"][:3])


def test_pca_records_its_explained_variance_and_reconstructs_low_rank_features(tmp_path):
    plain = _write(str(tmp_path / "plain.zarr"), LAYOUT, _features(12, rank=6))
    full = convert_store(plain.url, str(tmp_path / "pca6.zarr"), CompactConfig("pca", k=6, sample=8, batch=3))
    low = convert_store(plain.url, str(tmp_path / "pca2.zarr"), CompactConfig("pca", k=2, sample=8))
    shares = full.attrs["compact"]["explained_variance"]
    assert shares["raw"] > 0.999 and full.attrs["compact"]["sample"] == 8
    assert low.attrs["compact"]["explained_variance"]["raw"] < shares["raw"] - 0.05
    x = plain.get(plain.ids())["raw"].astype(np.float32)
    for store, most in ((full, 0.01), (low, 1.0)):
        y = store.get(store.ids())["raw"].astype(np.float32)
        assert np.linalg.norm(y - x) / np.linalg.norm(x - x.mean((0, 1, 2))) < most
    # the explained share is that of the sample's covariance spectrum (numpy, independently)
    ids = np.sort(np.random.default_rng(0).choice(plain.ids(), 8, replace=False))
    tokens = plain.get(ids)["raw"].astype(np.float64).reshape(-1, 32)
    values = np.linalg.eigvalsh(np.cov(tokens.T, bias=True))[::-1]
    assert low.attrs["compact"]["explained_variance"]["raw"] == pytest.approx(values[:2].sum() / values.sum(), rel=1e-6)
    assert low.zarr_arrays["raw_pca"].shape == (12, 4, 4, 2)


def test_a_compact_store_read_as_if_uncompressed_fails_in_one_line(tmp_path, monkeypatch):
    plain = _write(str(tmp_path / "plain.zarr"), LAYOUT, _features(4, rank=4))
    pca = convert_store(plain.url, str(tmp_path / "pca.zarr"), CompactConfig("pca", k=3, sample=4))
    group = zarr.open_group(pca.url, mode="r")
    with pytest.raises(KeyError, match="raw"):  # a plain Zarr read: no array that looks like features
        group["raw"]
    with pytest.raises(ValueError, match="already compact"):
        convert_store(pca.url, str(tmp_path / "again.zarr"))
    monkeypatch.setattr(layout_module, "FORMAT_VERSION", 1)  # a dvt from before compact stores
    with pytest.raises(StoreError, match="has store format 2; this dvt .* reads up to 1: upgrade"):
        FeatureStore.open(pca.url)
    FeatureStore.open(plain.url)  # plain stores stay readable by it
    with pytest.raises(ValueError, match="--pca K must be between 1 and 31"):
        dataclasses.replace(LAYOUT, compact={"kind": "pca", "k": 32})


def test_denoise_writes_int8_directly_and_refuses_pca(tmp_path, sample_images):
    base = DenoiseConfig(images=str(sample_images[0].parent), limit=1, output=str(tmp_path / "s.zarr"), model="tests.custom_backbone:create",
                         weights="none", input_size=32, preset="ci")
    assert plan_denoise(dataclasses.replace(base, compress="int8")).layout.compact == {"kind": "int8"}
    with pytest.raises(JobConfigError, match="PCA needs a basis"):
        plan_denoise(dataclasses.replace(base, compress="pca"))


def test_the_documented_zarr_and_xarray_decoding_gives_the_features(tmp_path):
    import xarray as xr

    data = _features(5)
    store = _write(str(tmp_path / "int8.zarr"), dataclasses.replace(LAYOUT, compact={"kind": "int8"}), data)
    expected = store.get(np.arange(5))["clean"].astype(np.float32)
    ds = xr.open_zarr(store.url, consolidated=False)
    clean = (ds.clean_int8 * ds.clean_scale + ds.clean_offset).transpose("image", "y", "x", "channel").values
    np.testing.assert_allclose(clean, expected, rtol=2e-3, atol=1e-3)
    plain = _write(str(tmp_path / "plain.zarr"), LAYOUT, data)
    pca = convert_store(plain.url, str(tmp_path / "pca.zarr"), CompactConfig("pca", k=8, sample=5))
    g = zarr.open_group(pca.url, mode="r")
    coef = g["clean_pca"].get_orthogonal_selection((np.arange(5),)).astype("f4")
    by_hand = coef @ g["clean_pca_basis"][...].T + g["clean_pca_mean"][...]
    decoded = pca.get(np.arange(5))["clean"].astype(np.float32)
    np.testing.assert_allclose(by_hand, decoded, rtol=2e-3, atol=2e-2)
    ds = xr.open_zarr(pca.url, consolidated=False)
    with_xarray = xr.dot(ds.clean_pca.astype("f4"), ds.clean_pca_basis, dim="component") + ds.clean_pca_mean
    np.testing.assert_allclose(with_xarray.transpose("image", "y", "x", "channel").values, decoded, rtol=2e-3, atol=2e-2)


def test_a_pca_store_without_its_basis_refuses_to_write(tmp_path):
    layout = dataclasses.replace(LAYOUT, compact={"kind": "pca", "k": 4})
    store = FeatureStore.create(str(tmp_path / "nobasis.zarr"), layout, ["a.png"])
    with pytest.raises(StoreError, match="PCA basis of 'raw' was never written"):
        store.write_unit([{"image_id": 0}], {k: v[:1] for k, v in _features(1).items()})
