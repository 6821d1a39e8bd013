"""Feature store throughput against plain s3fs on the same S3 server, in the same run.

Writes ``--images`` images (``raw`` and ``clean``, ``grid x grid x channels`` float16 each, 2 MiB at the
default ViT-B/14-at-518 size) in units of ``--unit`` images, once through :class:`pipeline.store.FeatureStore`
and once as plain ``s3fs.pipe`` of the same bytes (one object per image and array, one concurrent ``pipe`` per
unit), then reads them back (``FeatureStore.get`` against ``s3fs.cat``). The two alternate unit by unit (who
goes first alternates too), so both see the same load on a shared machine; ``--repeats`` passes, medians reported as a Markdown table with the store/s3fs ratio (target: at least 0.8) and the
number of objects the store keeps per image.

The server is the one in ``AWS_ENDPOINT_URL_S3`` if it answers (``eval "$(infra/object_store.sh env)"``),
else a moto server started here on 127.0.0.1.

    python benchmarks/store.py --images 64 --unit 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io.storage import filesystem  # noqa: E402
from pipeline.store import FeatureStore, StoreLayout  # noqa: E402
from pipeline.testing.object_store import MotoServer, answers  # noqa: E402


def start_server() -> MotoServer | None:
    """Use the S3 server in the environment, or start moto on a free loopback port."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "dvt-test-key")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dvt-test-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint and answers(endpoint):
        return None
    try:
        server = MotoServer()
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
    return server


def timed(fn: Callable[[list[int]], object], ids: list[int]) -> float:
    start = time.perf_counter()
    fn(ids)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    layout = StoreLayout(backbone="vit_base_patch14_dinov2.lvd142m", block=11, input_size=(14 * args.grid,) * 2,
                         patch_size=14, stride=14, grid=(args.grid, args.grid), channels=args.channels)
    n, names = args.images, layout.arrays
    rng = np.random.default_rng(0)
    data = {a: rng.standard_normal((n, *layout.image_shape), dtype=np.float32).astype(np.float16) for a in names}
    units = [list(range(i, min(n, i + args.unit))) for i in range(0, n, args.unit)]
    nbytes = sum(d.nbytes for d in data.values())
    bucket = f"dvt-bench-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}", skip_instance_cache=True)
    fs.mkdir(bucket)
    times: dict[str, list[float]] = {"store write": [], "s3fs pipe": [], "store read": [], "s3fs cat": []}
    objects_per_image = 0.0
    try:
        for rep in range(args.repeats):
            url = f"s3://{bucket}/r{rep}/features.zarr"
            prefix = f"{bucket}/r{rep}/plain"
            store = FeatureStore.create(url, layout, [f"img{i}" for i in range(n)])
            reader = FeatureStore.open(url)
            steps = {
                "store write": lambda ids: store.write_unit([{"image_id": i, "uri": f"img{i}"} for i in ids],
                                                            {a: data[a][ids] for a in names}),
                "s3fs pipe": lambda ids: fs.pipe({f"{prefix}/{a}/{i}": data[a][i].tobytes() for a in names for i in ids}),
                "store read": lambda ids: reader.get(ids),
                "s3fs cat": lambda ids: fs.cat([f"{prefix}/{a}/{i}" for a in names for i in ids]),
            }
            # Interleave unit by unit, alternating who goes first, so both see the same machine load.
            for phase in (("store write", "s3fs pipe"), ("store read", "s3fs cat")):
                spent = dict.fromkeys(phase, 0.0)
                if phase[0] == "store read":
                    reader.refresh().manifest()
                for k, ids in enumerate(units):
                    for label in (phase if (k + rep) % 2 == 0 else phase[::-1]):
                        spent[label] += timed(steps[label], ids)
                for label, t in spent.items():
                    times[label].append(t)
            np.testing.assert_array_equal(reader.read("clean", units[-1]), data["clean"][units[-1]])
            objects_per_image = len(fs.find(f"{bucket}/r{rep}/features.zarr")) / n
            fs.rm(f"{bucket}/r{rep}", recursive=True)
    finally:
        fs.rm(bucket, recursive=True)
    mbps = {k: nbytes / 1e6 / statistics.median(v) for k, v in times.items()}
    return {
        "images": n, "unit": args.unit, "image_mib_per_array": layout.image_nbytes / 2**20, "arrays": list(names),
        "mb_per_pass": nbytes / 1e6, "repeats": args.repeats, "mb_s": mbps,
        "write_ratio": mbps["store write"] / mbps["s3fs pipe"], "read_ratio": mbps["store read"] / mbps["s3fs cat"],
        "objects_per_image": objects_per_image,
        "parts_per_image": len(units) / n, "endpoint": os.environ["AWS_ENDPOINT_URL_S3"],
    }


def table(r: dict) -> str:
    m = r["mb_s"]
    return "\n".join([
        f"{r['images']} images x {len(r['arrays'])} arrays x {r['image_mib_per_array']:.2f} MiB, units of "
        f"{r['unit']}, interleaved unit by unit, median of {r['repeats']} passes, S3 at {r['endpoint']}",
        "",
        "| direction | feature store MB/s | plain s3fs MB/s | ratio (target >= 0.8) |",
        "|---|---:|---:|---:|",
        f"| write | {m['store write']:.0f} | {m['s3fs pipe']:.0f} | {r['write_ratio']:.2f} |",
        f"| read | {m['store read']:.0f} | {m['s3fs cat']:.0f} | {r['read_ratio']:.2f} |",
        "",
        f"Objects per image in the store: {r['objects_per_image']:.3f} ({len(r['arrays'])} chunks + "
        f"{r['parts_per_image']:.3f} manifest parts + fixed metadata).",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--unit", type=int, default=8, help="images per work unit")
    parser.add_argument("--grid", type=int, default=37, help="feature grid side (37: ViT-B/14 at 518)")
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON too")
    args = parser.parse_args(argv)
    server = start_server()
    try:
        result = run(args)
    finally:
        if server is not None:
            server.stop()
    print(table(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
