"""``dvt denoise`` over the same small images as loose files, as WebDataset tar shards and as Parquet shards.

Writes ``--images`` random ``--size`` px JPEGs three ways (``img2dataset`` layouts: ``NNNNN.tar`` with ``KEY.jpg``,
``KEY.json``, ``KEY.txt``; Parquet with ``key``, ``url``, ``caption``, ``jpg``; ``--per-shard`` images a shard),
then runs :func:`pipeline.denoise.job.run_denoise` with ``--method average --copies 1`` on each into a fresh store
under one local Ray, after an unreported warm-up job (the first job of a process pays for cold worker
processes). Per row: the listing step alone (URIs, or the shard index), and the job's images/s end to end
(its summary: images over the run's seconds, the actor's start-up included). With ``--s3`` the inputs lie on a
local moto S3 server instead of the local filesystem.

    python benchmarks/shard_inputs.py --images 1024 --per-shard 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.denoise.job import DenoiseConfig, run_denoise  # noqa: E402
from pipeline.io.storage import filesystem  # noqa: E402
from pipeline.runtime.inputs import list_inputs  # noqa: E402
from pipeline.testing.shard_writers import make_items, write_shard  # noqa: E402

MODEL = "pipeline.testing.artifact_vit:create_small"


def write_inputs(root: str, n: int, per_shard: int, size: int) -> dict[str, str]:
    """The same images as loose files, tar shards and Parquet shards under ``root``; returns each ``--images``."""
    fs, _ = filesystem(root)
    shards = -(-n // per_shard)
    for s in range(shards):
        items = make_items(s, min(per_shard, n - s * per_shard), size=size)
        write_shard(f"{root}/tar/{s:05d}.tar", items)
        write_shard(f"{root}/parquet/{s:05d}.parquet", items)
        for item in items:
            path = f"{root}/loose/{item.key}.jpg".split("://", 1)[-1]
            if "://" not in root:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(item.image)
    return {"loose files": f"{root}/loose/", "tar shards": f"{root}/tar/{{00000..{shards - 1:05d}}}.tar",
            "parquet shards": f"{root}/parquet/"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--images-per-batch", type=int, default=32)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--s3", action="store_true", help="inputs and stores on a local moto S3 server")
    parser.add_argument("--order", default="loose,tar,parquet",
                        help="which inputs to run, in this order (a shared machine's load drifts: rotate it)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    server = None
    if args.s3:
        from pipeline.testing.object_store import MotoServer

        server = MotoServer()
        os.environ.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        fs, _ = filesystem("s3://dvt-shard-bench")
        fs.mkdir("dvt-shard-bench")
    import ray

    for attempt in range(3):  # a busy machine can miss Ray's fixed 30 s start-up wait
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a shared one
            break
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
            ray.shutdown()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="dvt-shards-") as tmp:
            root = "s3://dvt-shard-bench/in" if args.s3 else f"{tmp}/in"
            sources = write_inputs(root, args.images, args.per_shard, args.size)
            # Warm-up, not reported: the first job of a process pays for cold worker processes and imports.
            run_denoise(DenoiseConfig(images=sources["loose files"], output=f"{tmp}/warmup.zarr", model=MODEL,
                                      weights="none", input_size=args.input_size, method="average", copies=1,
                                      images_per_batch=args.images_per_batch, limit=args.images_per_batch,
                                      cpus_per_worker=args.cpus_per_worker, progress_every_s=60.0))
            for name in [n for key in args.order.split(",") for n in sources if n.startswith(key)]:
                images = sources[name]
                config = DenoiseConfig(images=images, output=f"{root.rsplit('/', 1)[0]}/{name.split()[0]}.zarr",
                                       model=MODEL, weights="none", input_size=args.input_size, method="average",
                                       copies=1, images_per_batch=args.images_per_batch,
                                       cpus_per_worker=args.cpus_per_worker, progress_every_s=60.0)
                began = time.perf_counter()
                listed = len(list_inputs(config))
                list_s = time.perf_counter() - began
                summary = run_denoise(config)
                rows.append({"input": name, "images": listed, "listing_s": round(list_s, 2),
                             "job_s": round(summary.seconds, 1), "images_per_s": round(summary.images_per_second, 1),
                             "ok": summary.ok, "failed": summary.failed})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    print(f"\n| input ({'local S3' if args.s3 else 'local files'}) | images | listing s | job s | images/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['input']} | {r['images']} | {r['listing_s']} | {r['job_s']} | {r['images_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
