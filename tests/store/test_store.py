"""Feature store: layout, commit protocol, readers, S3 behaviour, concurrent and killed writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
import warnings

import numpy as np
import pyarrow as pa
import pytest

from pipeline.store.listing_table import extend_listing, make_listing
from pipeline.store.manifest import MANIFEST_SCHEMA, unit_id
from pipeline.io.storage import AccessDeniedError, BucketNotFoundError, filesystem, storage_errors, storage_options
from pipeline.store import FeatureStore, StoreError, StoreLayout, StoreMismatchError, StoreNotFoundError

GRID, C = (4, 5), 8
LAYOUT = StoreLayout(backbone="vit_small_patch14_dinov2", block=11, input_size=(56, 70), patch_size=14, stride=14,
                     grid=GRID, channels=C, method={"steps": 400, "lr": 0.01})
URIS = [f"s3://images/img{i:03d}.jpg" for i in range(12)]


def feature(image_id: int, name: str, shape=(*GRID, C)) -> np.ndarray:
    """Deterministic features per (image, array), so any process can check what another wrote."""
    seed = image_id * 1000 + sum(map(ord, name))
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def unit_arrays(ids, names=("raw", "clean"), shape=(*GRID, C)) -> dict[str, np.ndarray]:
    return {n: np.stack([feature(i, n, shape) for i in ids]) for n in names}


def records(ids, **extra) -> list[dict]:
    return [{"image_id": i, "width": 640 + i, "height": 480, "seconds": 1.5 * i,
             "losses": {"mse": 0.1 * i, "cos": 0.01}, **extra} for i in ids]


@pytest.fixture()
def mem_url() -> str:
    return f"memory://store-{uuid.uuid4().hex[:8]}/features.zarr"


@pytest.fixture()
def store(mem_url) -> FeatureStore:
    return FeatureStore.create(mem_url, LAYOUT, URIS)


# ------------------------------------------------------------------------------------------------ memory://

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_every_array_and_manifest(mem_url, dtype):
    layout = StoreLayout(**{**LAYOUT.__dict__, "dtype": dtype, "arrays": ("raw", "clean", "artifact")})
    store = FeatureStore.create(mem_url, layout, URIS)
    names = ("raw", "clean", "artifact")
    store.write_unit(records([0, 1, 2]), unit_arrays([0, 1, 2], names))
    store.write_unit([*records([4]), {"image_id": 5, "status": "failed", "error": "cannot decode"}],
                     unit_arrays([4], names))

    reader = FeatureStore.open(mem_url)
    assert reader.layout == layout and reader.attrs["package_version"]
    got = reader.get([4, 0, 2], names)
    for n in names:
        assert got[n].dtype == np.dtype(dtype) and got[n].shape == (3, *GRID, C)
        np.testing.assert_array_equal(got[n], unit_arrays([4, 0, 2], (n,))[n].astype(dtype))
    m = reader.manifest().to_pylist()
    assert [r["image_id"] for r in m] == [0, 1, 2, 4, 5]
    assert [r["status"] for r in m] == ["ok"] * 4 + ["failed"]
    assert set(m[1]) == set(MANIFEST_SCHEMA.names) and m[1]["uri"] == URIS[1] and m[1]["row"] == 1
    assert (m[1]["width"], m[1]["height"], m[1]["seconds"]) == (641, 480, 1.5)
    assert dict(m[1]["losses"]) == {"mse": pytest.approx(0.1), "cos": 0.01}
    assert m[4]["error"] == "cannot decode" and m[4]["uri"] == URIS[5]
    assert reader.todo().tolist() == [3, 6, 7, 8, 9, 10, 11]
    assert reader.todo(retry_failed=True).tolist() == [3, 5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(KeyError, match=r"\[5\] are not finished"):
        reader.get([5])
    assert np.isnan(reader.read("clean", [5], check=False)).all()  # never written: fill value


def test_torch_in_and_out(store):
    import torch

    clean = torch.from_numpy(unit_arrays([3])["clean"]).requires_grad_()
    store.write_unit(records([3]), {"raw": torch.from_numpy(unit_arrays([3])["raw"]).to(torch.bfloat16), "clean": clean})
    out = store.read("clean", [3], as_torch=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), clean.detach().half().float())


def test_unit_writer_commits_only_on_success(store):
    with store.unit() as unit:
        unit.add({"image_id": 1, "seconds": 2.0, "residual_norm": 0.5}, **{n: a[0] for n, a in unit_arrays([1]).items()})
        unit.fail(2, "RuntimeError('diverged')")
    assert store.ids().tolist() == [1] and store.ids("failed").tolist() == [2]
    assert dict(store.manifest().to_pylist()[0]["stats"]) == {"residual_norm": 0.5}
    with pytest.raises(RuntimeError):
        with store.unit() as unit:
            unit.add(3, **{n: a[0] for n, a in unit_arrays([3]).items()})
            raise RuntimeError("worker died")
    assert 3 not in store.refresh().ids() and store.fs.find(f"{store.root}/clean/c/3") == []


def test_retried_unit_rewrites_its_own_part_and_ok_beats_failed(store):
    first = store.write_unit([{"image_id": 6, "status": "failed", "error": "timeout"}, *records([7])],
                             {n: a for n, a in unit_arrays([7]).items()})
    again = store.write_unit([{"image_id": 6, "status": "failed", "error": "timeout"}, *records([7])],
                             unit_arrays([6, 7]))  # arrays for every record: failed rows are ignored
    assert first == again == unit_id([7, 6])
    assert len(store.fs.find(f"{store.root}/manifest/parts")) == 1
    assert store.fs.find(f"{store.root}/raw/c/6") == []
    store.write_unit(records([6]), unit_arrays([6]))  # a later run retries the failed image
    assert store.refresh().ids().tolist() == [6, 7] and store.ids("failed").size == 0
    assert len(store.manifest(refresh=True)) == 2
    assert store.compact() == 2
    assert store.refresh().ids().tolist() == [6, 7] and len(store.fs.find(f"{store.root}/manifest/parts")) == 1


def test_data_without_manifest_part_is_not_trusted(store):
    store.write_rows(np.array([8, 9]), {n: a.astype("float16") for n, a in unit_arrays([8, 9]).items()})
    assert store.fs.find(f"{store.root}/clean/c/8")  # the chunks are there ...
    assert store.ids().size == 0 and {8, 9} <= set(store.todo().tolist())  # ... but nobody trusts them
    with pytest.raises(KeyError):
        store.get([8])
    assert store.info().pending == len(URIS)


def test_bad_writes_are_refused_with_clear_errors(store):
    wrong = {"raw": np.zeros((1, 4, 5, 16)), "clean": np.zeros((1, 4, 5, 16))}
    with pytest.raises(StoreMismatchError, match=r"\(1, 4, 5, 16\).*\(4, 5, 8\)"):
        store.write_unit(records([0]), wrong)
    with pytest.raises(ValueError, match="outside the store's 12 rows"):
        store.write_unit(records([12]), unit_arrays([12]))
    with pytest.raises(ValueError, match="twice"):
        store.write_unit(records([1, 1]), unit_arrays([1, 1]))
    with pytest.raises(ValueError, match="holds arrays"):
        store.write_unit(records([1]), {"raw": unit_arrays([1])["raw"]})
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(store.url).write_unit(records([1]), unit_arrays([1]))
    bad = unit_arrays([0, 1])
    bad["clean"][1, 0, 0, 0] = 1e6  # overflows float16
    store.write_unit(records([0, 1]), bad)
    assert store.ids().tolist() == [0] and "non-finite" in store.manifest()["error"][1].as_py()


def test_store_modules_name_the_store_by_protocol_and_import_no_cycle(store):
    """The store's helper modules see it through ``StoreHandle``: none imports ``feature_store`` (which imports
    them), not even for type hints, and the class satisfies the protocol."""
    import ast
    from pathlib import Path

    from pipeline.store.handle import StoreHandle

    assert isinstance(store, StoreHandle)
    folder = Path(__file__).parents[2] / "pipeline" / "store"
    imports = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {n.module.split(".")[0] for n in ast.walk(tree)
                              if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(d == target or (d not in seen and reaches(d, target, seen | {d})) for d in imports.get(start, ()))

    assert [m for m in imports if m != "__init__" and reaches(m, m, {m})] == []
    assert [m for m in imports if "feature_store" in imports[m] and m != "__init__"] == []


def test_listing_is_deterministic_and_append_only(mem_url):
    listing = make_listing(["b.jpg", "a.jpg", "b.jpg", "c.jpg"])
    assert listing["uri"].to_pylist() == ["b.jpg", "a.jpg", "c.jpg"] and listing["image_id"].to_pylist() == [0, 1, 2]
    grown = extend_listing(listing, ["d.jpg", "a.jpg", "e.jpg"])
    assert grown["uri"].to_pylist() == ["b.jpg", "a.jpg", "c.jpg", "d.jpg", "e.jpg"]
    with pytest.raises(ValueError, match="only grow at the end"):
        extend_listing(listing, pa.table({"image_id": [0, 1, 2], "uri": ["a.jpg", "b.jpg", "c.jpg"]}))
    with pytest.raises(ValueError, match="dense"):
        extend_listing(None, pa.table({"image_id": [0, 2], "uri": ["a", "b"]}))

    store = FeatureStore.create(mem_url, LAYOUT, listing)
    store.write_unit(records([2]), unit_arrays([2]))
    again = FeatureStore.create(mem_url, LAYOUT, ["a.jpg", "z.jpg"])  # a re-run with one new image
    assert again.num_rows == 4 and again.listing()["uri"].to_pylist()[-1] == "z.jpg"
    assert again.todo().tolist() == [0, 1, 3] and again.get([2])["clean"].shape == (1, *GRID, C)
    assert FeatureStore.open(mem_url).layout.grid == GRID


def test_config_mismatch_is_refused_naming_both_sides(store):
    other = StoreLayout(**{**LAYOUT.__dict__, "backbone": "vit_base_patch16_224.dino", "block": 7})
    with pytest.raises(StoreMismatchError, match=r"backbone: store has 'vit_small_patch14_dinov2', expected "
                                                 r"'vit_base_patch16_224.dino'; block: store has 11, expected 7"):
        FeatureStore.open(store.url, expect=other)
    with pytest.raises(StoreMismatchError, match="channels: store has 8, expected 768"):
        FeatureStore.open(store.url, expect={"channels": 768})
    assert FeatureStore.open(store.url, expect={"grid": GRID, "block": 11}).num_rows == len(URIS)
    with pytest.raises(StoreMismatchError, match="overwrite=True"):
        FeatureStore.create(store.url, other, URIS)

    new_stage1 = StoreLayout(**{**LAYOUT.__dict__, "method": {"steps": 800, "lr": 0.01}})
    with pytest.raises(StoreMismatchError, match=r"other run settings: steps: store has 400, this run 800\. Pass "):
        FeatureStore.create(store.url, new_stage1, URIS)
    changed = FeatureStore.create(store.url, new_stage1, URIS, allow_config_change=True)
    assert changed.attrs["method"]["steps"] == 800 and changed.attrs["history"][0]["method"]["steps"] == 400

    store.write_unit(records([0]), unit_arrays([0]))
    fresh = FeatureStore.create(store.url, other, URIS, overwrite=True)
    assert fresh.layout.backbone == "vit_base_patch16_224.dino" and fresh.ids().size == 0


def test_stores_that_call_the_method_record_stage1_still_read_and_append(tmp_path):
    """Older stores keep the record under ``stage1``: it reads as ``method``, an unchanged run appends, and a run
    that changes the record rewrites it under the new name, the old one in ``history``."""
    import zarr

    url = str(tmp_path / "old.zarr")
    FeatureStore.create(url, LAYOUT, URIS[:4]).write_unit(records([0]), unit_arrays([0]))
    group = zarr.open_group(url, mode="r+")
    group.attrs.update({"stage1": group.attrs["method"]})
    del group.attrs["method"]
    old = FeatureStore.open(url)
    assert old.layout.method == LAYOUT.method and old.attrs["method"] == {"steps": 400, "lr": 0.01}
    assert FeatureStore.create(url, LAYOUT, URIS).num_rows == len(URIS)  # same settings: appends
    assert "stage1" in zarr.open_group(url, mode="r").attrs
    with pytest.raises(StoreMismatchError, match="steps: store has 400, this run 800"):
        FeatureStore.create(url, StoreLayout(**{**LAYOUT.__dict__, "method": {"steps": 800, "lr": 0.01}}), URIS)
    changed = FeatureStore.create(url, StoreLayout(**{**LAYOUT.__dict__, "method": {"steps": 800, "lr": 0.01}}), URIS,
                                  allow_config_change=True)
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    assert "stage1" not in attrs and attrs["method"]["steps"] == 800 and attrs["history"][0]["method"]["steps"] == 400
    assert np.array_equal(changed.get([0])["clean"][0], feature(0, "clean").astype(np.float16))


def test_urls_that_are_not_stores(mem_url, tmp_path):
    with pytest.raises(StoreNotFoundError, match="not a DVT feature store: there is no zarr.json"):
        FeatureStore.open(mem_url)
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreNotFoundError, match="Zarr group but not a DVT feature store"):
        FeatureStore.open(str(tmp_path / "plain.zarr"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not yours")
    with pytest.raises(StoreError, match="not a DVT feature store; refusing"):
        FeatureStore.create(f"file://{tmp_path / 'photos'}", LAYOUT, URIS, overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_unfinished_creation_is_redone_and_stores_pickle_as_urls(mem_url):
    import pickle

    import zarr

    zarr.open_group(mem_url, mode="w", attributes={"format": "dvt-feature-store", "creating": True})
    with pytest.raises(StoreNotFoundError, match="did not finish"):
        FeatureStore.open(mem_url)
    store = FeatureStore.create(mem_url, LAYOUT, URIS)  # a driver killed while creating: start again
    store.write_unit(records([1]), unit_arrays([1]))
    copy = pickle.loads(pickle.dumps(store))
    assert copy.mode == "r+" and copy.ids().tolist() == [1]


def test_local_store_and_iter_pairs(tmp_path):
    store = FeatureStore.create(tmp_path / "f.zarr", LAYOUT, URIS)
    for ids in ([0, 1, 2], [3, 4], [6, 9]):
        store.write_unit(records(ids), unit_arrays(ids))
    assert not [p for p in store.fs.find(store.root) if ".tmp-" in p] and store.ids().size == 7
    batches = list(FeatureStore.open(f"file://{tmp_path}/f.zarr").iter_pairs(batch_size=3))
    assert [len(raw) for raw, _ in batches] == [3, 3, 1]
    raw, clean = batches[1]
    np.testing.assert_array_equal(clean, unit_arrays([3, 4, 6], ("clean",))["clean"].astype("float16"))
    shuffled = list(store.iter_pairs(batch_size=2, shuffle=True, seed=1, drop_last=True, as_torch=True))
    assert len(shuffled) == 3 and shuffled[0][0].shape == (2, *GRID, C)


def test_cli_info(store, capsys):
    from jobs.cli import main

    store.write_unit([*records([0, 1]), {"image_id": 2, "status": "failed", "error": "cannot decode: truncated"}],
                     unit_arrays([0, 1]))
    assert main(["store", "info", store.url]) == 0
    out = capsys.readouterr().out
    assert "12 listed, 2 ok, 1 failed, 9 pending" in out and "1 x cannot decode: truncated" in out
    assert "vit_small_patch14_dinov2 block 11" in out and "array clean" in out
    assert main(["store", "info", "--json", "--no-size", store.url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] == 2 and info["arrays"]["raw"]["chunks"] == [1, *GRID, C] and info["size_bytes"] is None
    assert main(["store", "info", store.url + "-missing"]) == 1


def test_storage_errors_say_what_to_do(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(AccessDeniedError, match=r"Access denied to s3://b/x.*127.0.0.1:9.*AWS_PROFILE") as e:
        with storage_errors("s3://b/x"):
            raise PermissionError("Access Denied")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(e.value)
    with pytest.raises(BucketNotFoundError, match="bucket 'b' does not exist.*aws s3 mb s3://b"):
        with storage_errors("s3://b/x"):
            raise FileNotFoundError("The specified bucket does not exist")
    with pytest.raises(FileNotFoundError) as plain:
        with storage_errors("s3://b/x"):
            raise FileNotFoundError("b/x/zarr.json")
    assert type(plain.value) is FileNotFoundError


# ------------------------------------------------------------------------------------------------ S3

def test_s3_round_trip_xarray_and_no_secrets(s3_bucket):
    import xarray as xr

    url = f"{s3_bucket}/run1/features.zarr"
    layout = StoreLayout(**{**LAYOUT.__dict__, "arrays": ("raw", "clean", "artifact")})
    names = layout.arrays
    store = FeatureStore.create(url, layout, URIS)
    store.write_unit(records([0, 1, 2, 3]), unit_arrays([0, 1, 2, 3], names))
    store.write_unit(records([7, 5]), unit_arrays([7, 5], names))  # rows need not be contiguous

    reader = FeatureStore.open(url, expect=layout)
    got = reader.get([5, 0, 7], names)
    for n in names:
        np.testing.assert_array_equal(got[n], unit_arrays([5, 0, 7], (n,))[n].astype("float16"))
    assert reader.ids().tolist() == [0, 1, 2, 3, 5, 7]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr must not complain about the manifest folder
        ds = xr.open_zarr(url, consolidated=False, storage_options=storage_options(url))
    assert ds["clean"].dims == ("image", "y", "x", "channel") and ds["clean"].shape == (12, *GRID, C)
    assert ds.attrs["backbone"] == LAYOUT.backbone and ds.attrs["method"]["steps"] == 400
    np.testing.assert_array_equal(ds["raw"][7].values, feature(7, "raw").astype("float16"))

    info = reader.info()
    assert (info.ok, info.pending, info.manifest_parts) == (6, 6, 2)
    assert info.objects == 3 * 6 + 5 + 1 + 2  # chunks, zarr.json (root, 3 arrays, manifest), listing, parts
    fs, root = filesystem(url)
    blobs = fs.cat(fs.find(root))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert not any(secret in b or b"dvt-test-key" in b for b in blobs.values())
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in info.format()


def test_s3_missing_bucket(s3_endpoint):
    url = f"s3://dvt-missing-{uuid.uuid4().hex[:8]}/x.zarr"
    with pytest.raises(BucketNotFoundError, match=r"bucket 'dvt-missing-\w+' does not exist.*aws s3 mb"):
        FeatureStore.open(url)
    with pytest.raises(BucketNotFoundError, match="create it first"):
        FeatureStore.create(url, LAYOUT, URIS)


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import pipeline.store as ps
    import pipeline.store.writer as psw

    def feature(image_id, name):
        seed = image_id * 1000 + sum(map(ord, name))
        return np.random.default_rng(seed).standard_normal({shape!r}).astype(np.float32)

    url, mode = sys.argv[1], sys.argv[3]
    units = [list(map(int, u.split(","))) for u in sys.argv[2].split(";")]
    store = ps.FeatureStore.open(url, "r+")
    if mode == "hang":  # stop after the data of the last unit, before its manifest part
        real = psw.write_part
        def write_part(fs, root, recs, unit):
            if recs[0].image_id == units[-1][0]:
                print("DATA", flush=True)
                time.sleep(120)
            return real(fs, root, recs, unit)
        psw.write_part = write_part
    print("READY", flush=True)
    sys.stdin.readline()
    for ids in units:
        store.write_unit([{{"image_id": i}} for i in ids],
                         {{n: np.stack([feature(i, n) for i in ids]) for n in ("raw", "clean")}})
""")


def _writers(url: str, *jobs: list[list[int]], mode: str = "normal") -> list[subprocess.Popen]:
    """Writer processes, each started and waiting at a barrier: released together by :func:`_go`."""
    code = WRITER.format(shape=(*GRID, C))
    procs = [subprocess.Popen([sys.executable, "-c", code, url, ";".join(",".join(map(str, u)) for u in units), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for units in jobs]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    return procs


def _go(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def test_s3_two_processes_write_disjoint_units(s3_bucket):
    url = f"{s3_bucket}/features.zarr"
    FeatureStore.create(url, LAYOUT, URIS)
    procs = _writers(url, [[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10, 11]])
    _go(procs)  # released together, so their writes interleave
    for p in procs:
        assert p.wait(timeout=60) == 0
    store = FeatureStore.open(url)
    assert store.ids().tolist() == list(range(12)) and store.todo().size == 0
    np.testing.assert_array_equal(store.read("clean", range(12)),
                                  unit_arrays(range(12), ("clean",))["clean"].astype("float16"))


def test_s3_writer_killed_mid_unit_then_resumed(s3_bucket):
    url = f"{s3_bucket}/features.zarr"
    FeatureStore.create(url, LAYOUT, URIS)
    (proc,) = _writers(url, [[0, 1, 2], [3, 4, 5]], mode="hang")
    _go([proc])
    assert proc.stdout.readline().strip() == "DATA"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    store = FeatureStore.open(url)
    assert store.fs.find(f"{store.root}/clean/c/4")  # the killed unit's chunks were written ...
    assert store.ids().tolist() == [0, 1, 2]  # ... but only the committed unit counts
    assert store.todo().tolist()[:3] == [3, 4, 5]
    with pytest.raises(KeyError):
        store.get([4])

    resumed = FeatureStore.open(url, "r+")
    for ids in np.array_split(resumed.todo(), 3):
        resumed.write_unit(records(ids.tolist()), unit_arrays(ids.tolist()))
    final = FeatureStore.open(url)
    assert final.ids().tolist() == list(range(12))
    np.testing.assert_array_equal(final.read("raw", range(12)), unit_arrays(range(12), ("raw",))["raw"].astype("float16"))


@pytest.mark.slow
def test_ray_dataset_view(s3_bucket, ray_local):
    url = f"{s3_bucket}/features.zarr"
    store = FeatureStore.create(url, LAYOUT, URIS)
    store.write_unit(records([0, 1, 2, 3, 4]), unit_arrays([0, 1, 2, 3, 4]))
    store.write_unit([{"image_id": 5, "status": "failed", "error": "x"}, *records([9])], unit_arrays([9]))
    ds = store.to_ray_dataset(batch_size=2, ids=[0, 2, 3, 9, 5])  # 5 failed: left out
    batches = list(ds.iter_torch_batches(batch_size=3))  # what Ray Train's get_dataset_shard(...) yields
    assert all(set(b) == {"image_id", "raw", "clean"} for b in batches)
    ids = np.concatenate([b["image_id"].numpy() for b in batches])
    clean = np.concatenate([b["clean"].numpy() for b in batches])
    assert sorted(ids.tolist()) == [0, 2, 3, 9]
    for i, c in zip(ids, clean):
        np.testing.assert_array_equal(c, feature(int(i), "clean").astype("float16"))


def test_info_prints_the_settings_each_stage1_preset_really_uses():
    import dataclasses

    from pipeline.stage1 import PRESETS
    from pipeline.store.inventory import stage1_lines

    default = "\n".join(stage1_lines(dataclasses.asdict(PRESETS["default"])))
    assert "24 random crops of 30-70% of the area" in default and "dense bilinear grid" in default
    assert "closed form, 30 alternating" in default and "hash grid" not in default and "Adam" not in default
    paper = "\n".join(stage1_lines(dataclasses.asdict(PRESETS["paper"])))
    assert "768 random crops of 10-50%" in paper and "hash grid (16 levels" in paper and "20000 steps" in paper
    assert "closed form" not in paper
    quality = "\n".join(stage1_lines(PRESETS["quality"].record()))
    assert "57 random crops of 30-70% of the area and 38 of 90-100% + the full view" in quality
    assert "full view weight 10, near-full views 3, both scaled per image" in quality and "rule k=3" in quality
    rule = "\n".join(stage1_lines(PRESETS["default"].replace(full_view_weight=1.0, full_view_rule=10.0).record()))
    assert "full view weight per image (rule k=10, from a first solve at 1)" in rule
    assert "per image" not in default and "near-full" not in default
