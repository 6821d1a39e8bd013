"""Object-store requests per image: ``dvt denoise``, ``dvt apply`` and training reads, counted at the S3 server,
and Zarr v3's sharding codec (one shard per 16-image unit) against one chunk per image, side by side.

A moto server on 127.0.0.1 logs every request it serves; each phase counts the lines it added, by method and by
what the key is (input image, array chunk, manifest part, ledger, Zarr metadata, lease). The jobs run as
subprocesses with their own local Ray, on ``--images`` small generated PNGs with the tiny custom backbone
(``tests.custom_backbone:create``), so the counts are the pipeline's own, not the model's.

    python benchmarks/requests.py --images 64
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.object_store import MotoServer  # noqa: E402

_log = logging.getLogger("requests")
BUCKET = "dvt-requests"
LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (/[^ ]*) HTTP')


def kind(path: str) -> str:
    key = path.split("?", 1)[0]
    if "list-type=2" in path or "delimiter=" in path or key.rstrip("/") == f"/{BUCKET}":
        return "list"
    if "/images/" in key:
        return "image"
    if "/manifest/parts/part-" in key:
        return "part"
    if "/manifest/" in key and key.endswith(".parquet"):
        return "ledger"
    if key.endswith("zarr.json"):
        return "zarr-meta"
    if key.endswith("lease.json"):
        return "lease"
    if "/c/" in key:
        return "chunk"
    return "other"


class Counts:
    """Requests the server logged since the last :meth:`take`."""

    def __init__(self, log: Path):
        self.log, self.offset = log, 0

    def take(self) -> Counter:
        text = self.log.read_text(errors="replace")
        new, self.offset = text[self.offset:], len(text)
        out: Counter = Counter()
        for method, path in LINE.findall(new):
            out[f"{method} {kind(path)}"] += 1
        return out


def per_image(counts: Counter, n: int) -> dict[str, float]:
    return {k: round(v / n, 3) for k, v in sorted(counts.items())}


def summary(counts: Counter, n: int) -> dict[str, float]:
    puts = sum(v for k, v in counts.items() if k.startswith(("PUT", "POST", "DELETE")))
    gets = sum(v for k, v in counts.items() if k.startswith(("GET", "HEAD")))
    return {"writes_per_image": round(puts / n, 3), "reads_per_image": round(gets / n, 3)}


def job(argv: list[str], env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def sharding(endpoint: str, counts: Counts, unit: int = 16, grid=(37, 37), channels: int = 768) -> dict:
    """Plain zarr on the same server: a unit's 16 images written as 16 chunks or as one shard, then one image
    and one unit read back, counting requests each way."""
    import zarr

    so = {"endpoint_url": endpoint, "key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    data = np.random.default_rng(0).standard_normal((unit, *grid, channels)).astype("float16")
    out = {}
    for name, shards in (("chunk per image", None), ("shard per unit", (unit, *grid, channels))):
        group = zarr.open_group(f"s3://{BUCKET}/shard-{'yes' if shards else 'no'}.zarr", mode="w", storage_options=so)
        arr = group.create_array("clean", shape=(unit * 4, *grid, channels), chunks=(1, *grid, channels),
                                 shards=shards, dtype="float16", fill_value=float("nan"))
        counts.take()
        arr[unit:2 * unit] = data  # one unit, as one worker writes it
        write = counts.take()
        reader = zarr.open_group(f"s3://{BUCKET}/shard-{'yes' if shards else 'no'}.zarr", mode="r", storage_options=so)
        counts.take()
        one = reader["clean"][unit + 3]
        read_one = counts.take()
        whole = reader["clean"][unit:2 * unit]
        read_unit = counts.take()
        assert np.array_equal(one, data[3]) and np.array_equal(whole, data)
        out[name] = {"write 16 images": dict(write), "open + read 1 image": dict(read_one),
                     "read the 16 images": dict(read_unit)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--unit", type=int, default=16, help="images per store unit (--images-per-batch)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for k, v in (("AWS_ACCESS_KEY_ID", "dvt-test-key"), ("AWS_SECRET_ACCESS_KEY", "dvt-test-secret"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)
    tmp = Path(tempfile.mkdtemp(prefix="dvt-requests-"))
    log = tmp / "moto.log"
    results: dict = {"images": args.images, "unit": args.unit}
    with MotoServer(log=str(log)) as server:
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        import s3fs
        from PIL import Image

        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        fs.mkdir(BUCKET)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
            fs.pipe(f"{BUCKET}/images/img{i:05d}.png", buf.getvalue())
        counts = Counts(log)
        counts.take()
        common = ["--images", f"s3://{BUCKET}/images/", "--model", "tests.custom_backbone:create", "--input-size",
                  "32", "--images-per-batch", str(args.unit), "--workers", "1", "--cpus-per-worker", "0.5"]
        job(["jobs.denoise", *common, "--output", f"s3://{BUCKET}/denoised.zarr", "--weights", "none", "--preset", "ci"],
            env)
        c = counts.take()
        results["denoise"] = {**summary(c, args.images), "by_kind": per_image(c, args.images)}
        _log.info("denoise: %s", results["denoise"])
        job(["jobs.denoise", *common, "--output", f"s3://{BUCKET}/denoised.zarr", "--weights", "none", "--preset", "ci"],
            env)
        c = counts.take()
        results["resume, nothing to do"] = {"requests": dict(c)}
        _log.info("resume: %s", dict(c))

        sys.path.insert(0, str(ROOT))
        from tests.custom_backbone import write_custom_denoiser

        weights, denoiser = write_custom_denoiser(str(tmp))
        apply_flags = [a for a in common if a not in ("--model", "tests.custom_backbone:create")]
        job(["jobs.apply_denoiser", *apply_flags, "--output", f"s3://{BUCKET}/applied.zarr", "--denoiser", denoiser,
             "--weights", weights], env)
        c = counts.take()
        results["apply"] = {**summary(c, args.images), "by_kind": per_image(c, args.images)}
        _log.info("apply: %s", results["apply"])

        from pipeline.store import FeatureStore

        store = FeatureStore.open(f"s3://{BUCKET}/denoised.zarr")
        counts.take()
        n = sum(len(r) for r, _ in store.iter_pairs(batch_size=8, shuffle=True))
        c = counts.take()
        results["training reads (iter_pairs, batch 8)"] = {**summary(c, n), "by_kind": per_image(c, n)}
        _log.info("training reads: %s", results["training reads (iter_pairs, batch 8)"])
        store.close()
        results["sharding (plain zarr, 37x37x768 float16, 16-image unit)"] = sharding(server.endpoint, counts)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
