"""How planning costs grow with the corpus: ``dvt store info``, ``FeatureStore.todo()``, a resume with nothing to
do, the driver's peak memory and compaction, on stores of N listed images.

Each store is built with the package's own writers, as a finished ``dvt denoise`` run leaves it: the listing
of N URIs (a ``.txt`` beside it, one URI a line, is the run's ``--images``), then N/16 manifest parts of 16
``ok`` images written with :func:`pipeline.store.manifest.write_part` as the workers write them ("parts"), and
the same ledger folded into one object as the folding job leaves it ("folded"). ``--prefolded`` writes the
folded ledger directly (one ``compact-*`` object, as :mod:`pipeline.store.ledger` writes it), which is how
10^7 fits in minutes. Array chunks are not written: nothing here reads them.

Every measurement runs in a fresh subprocess (so the peak RSS is the step's own): ``dvt store info URL``,
``FeatureStore.open(URL).todo()``, ``python -m jobs.denoise`` on the finished store (it must end with
"nothing to do": 0 to do) and ``dvt store compact``.

    python benchmarks/scale.py --sizes 100000 1000000 --root /tmp/dvt-scale
    python benchmarks/scale.py --sizes 10000000 --prefolded --root /tmp/dvt-scale
    python benchmarks/scale.py --sizes 100000 --s3          # the local S3 server (moto), same steps
    python benchmarks/scale.py --sizes 100000 --code /tmp/base   # the same steps run by another checkout
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store.manifest import (MANIFEST_SCHEMA, PARTS_DIR, ImageRecord, parquet_bytes, put_atomic,  # noqa: E402
                                     unit_id, write_part)

_log = logging.getLogger("scale")

UNIT = 16
#: The run the stores belong to: small and weightless, so checking it costs the same at every N.
JOB_FLAGS = ["--weights", "none", "--model", "vit_small_patch14_dinov2.lvd142m", "--input-size", "224",
             "--preset", "ci"]


def uris(n: int, prefix: str) -> pa.Array:
    """``n`` distinct image URIs, built in Arrow (10^7 Python strings would cost more than the store)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string()), 9, "0")
    return pc.binary_join_element_wise(prefix, digits, ".jpg", "")


def denoise_layout(images: str, output: str):
    """The layout ``dvt denoise JOB_FLAGS`` gives, from the job's own flag parsing."""
    from jobs.denoise import add_arguments
    from jobs.flags import image_job_config
    from pipeline.denoise.job import DenoiseConfig, plan_denoise

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--images", images, "--output", output, *JOB_FLAGS])
    config = image_job_config(DenoiseConfig, args)
    return plan_denoise(dataclasses.replace(config, limit=1, overwrite=True)).layout  # the layout lists nothing


def build(n: int, url: str, txt: Path, *, folded: bool, storage_options: dict) -> dict:
    """A finished store of ``n`` images at ``url`` and its URI list ``txt``; returns build timings."""
    from pipeline.io.storage import filesystem
    from pipeline.store import FeatureStore

    t0 = time.perf_counter()
    listed = uris(n, "file:///data/corpus/img-")
    txt.parent.mkdir(parents=True, exist_ok=True)
    with open(txt, "w") as f:  # one URI a line, written in slices so 10^7 never becomes one Python string
        for start in range(0, n, 1_000_000):
            f.write("\n".join(listed.slice(start, 1_000_000).to_pylist()) + "\n")
    listing = pa.table({"image_id": pa.array(np.arange(n, dtype=np.int64)), "uri": listed})
    store = FeatureStore.create(url, denoise_layout(str(txt), url), listing, overwrite=True,
                                storage_options=storage_options)
    t_listing = time.perf_counter() - t0
    fs, root = filesystem(url, **storage_options)
    root = root.rstrip("/")
    t0 = time.perf_counter()
    if folded:
        put_atomic(fs, f"{root}/{PARTS_DIR}/compact-{_stamp()}-built.parquet", parquet_bytes(_folded(listed)))
    else:
        def one(start: int) -> None:
            records = [ImageRecord(image_id=i, uri=None, width=640, height=480, seconds=1.0,
                                   losses={"total": 0.1}, stats={"residual_norm_mean": 1.0})
                       for i in range(start, min(n, start + UNIT))]
            for r in records:
                r.uri = f"file:///data/corpus/img-{r.image_id:09d}.jpg"
            write_part(fs, root, records, unit_id([r.image_id for r in records]))

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(0, n, UNIT)))
    store.close()
    return {"listing_s": t_listing, "ledger_s": time.perf_counter() - t0}


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")


def _folded(listed: pa.Array) -> pa.Table:
    """The ledger of a finished run folded into one table: one ok row per image, as the fold writes it."""
    n = len(listed)
    ids = pa.array(np.arange(n, dtype=np.int64))
    units = pc.binary_join_element_wise(
        pc.utf8_lpad(pc.cast(pa.array(np.arange(n, dtype=np.int64) // UNIT * UNIT), pa.string()), 12, "0"),
        "-000016-folded", "")
    when = pa.array(np.full(n, int(time.time() * 1000), dtype=np.int64)).cast(pa.timestamp("ms", tz="UTC"))
    cols = {
        "image_id": ids, "row": ids, "uri": listed, "status": pa.array(np.full(n, "ok", dtype=object), pa.string()),
        "error": pa.nulls(n, pa.string()), "width": pa.array(np.full(n, 640, dtype=np.int32)),
        "height": pa.array(np.full(n, 480, dtype=np.int32)), "seconds": pa.array(np.ones(n)),
        "losses": pa.nulls(n, MANIFEST_SCHEMA.field("losses").type),
        "stats": pa.nulls(n, MANIFEST_SCHEMA.field("stats").type), "unit": units,
        "worker": pa.array(np.full(n, "builder:1", dtype=object), pa.string()), "written_at": when}
    return pa.table(cols, schema=MANIFEST_SCHEMA)


def measure(code: str, argv: list[str], env: dict) -> dict:
    """Run one step in a fresh process; its wall time, CPU time (user + system: on a machine shared with other
work it moves less than wall time), peak RSS (GiB) and exit status.

    The RSS comes from ``/usr/bin/time``, which starts the step itself: a child forked from this (large) process
    would carry this process's pages in its own high-water mark.
    """
    report = Path(env.get("TMPDIR", "/tmp")) / f"scale-rss-{os.getpid()}.txt"
    cmd = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(report), sys.executable, *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    kib, user, system = report.read_text().split()[-3:]
    return {"s": round(seconds, 2), "cpu_s": round(float(user) + float(system), 2),
            "rss_gib": round(int(kib) / 2**20, 3), "rc": proc.returncode,
            "tail": proc.stdout.strip().splitlines()[-3:]}


def run_steps(n: int, url: str, txt: Path, code: str, env: dict, steps: list[str]) -> dict:
    todo = ("import sys; from pipeline.store import FeatureStore; s = FeatureStore.open(sys.argv[1]); "
            "print('todo', len(s.todo()))")
    commands = {
        "info": ["-m", "jobs.cli", "store", "info", url],
        "todo": ["-c", todo, url],
        "resume": ["-m", "jobs.denoise", "--images", str(txt), "--output", url, *JOB_FLAGS],
        "compact": ["-m", "jobs.cli", "store", "compact", url],
    }
    out = {}
    for step in steps:
        out[step] = measure(code, commands[step], env)
        _log.info("N=%d %s: %.1f s (%.1f s CPU), %.2f GiB, rc %d %s", n, step, out[step]["s"], out[step]["cpu_s"],
                  out[step]["rss_gib"],
                  out[step]["rc"], out[step]["tail"][-1:] if out[step]["rc"] else "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--root", default="/tmp/dvt-scale", help="local folder for stores and URI lists")
    parser.add_argument("--prefolded", action="store_true", help="write the folded ledger directly (no parts)")
    parser.add_argument("--s3", action="store_true", help="stores on the local S3 server (moto) instead")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose jobs are measured (default: this one)")
    parser.add_argument("--steps", nargs="+", default=["info", "todo", "resume", "compact", "info", "todo", "resume"],
                        help="steps in order; 'compact' folds the ledger as the job leaves it")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--reuse", action="store_true", help="measure the local store a --keep run left (no build)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    env = {**os.environ, "PYTHONPATH": args.code, "HF_HUB_OFFLINE": "1"}
    storage_options: dict = {}
    server = None
    if args.s3:
        from pipeline.testing.object_store import MotoServer

        for k, v in (("AWS_ACCESS_KEY_ID", "dvt-test-key"), ("AWS_SECRET_ACCESS_KEY", "dvt-test-secret"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        server = MotoServer()
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
        env.update({k: os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                              "AWS_DEFAULT_REGION")})
        import s3fs

        s3fs.S3FileSystem(endpoint_url=server.endpoint).mkdir("dvt-scale")
    results = []
    try:
        for n in args.sizes:
            local = Path(args.root) / f"n{n}"
            url = f"s3://dvt-scale/n{n}.zarr" if args.s3 else str(local / "store.zarr")
            txt = local / "images.txt"
            if args.reuse and txt.exists() and not args.s3:
                built = {"reused": str(local)}
            else:
                shutil.rmtree(local, ignore_errors=True)
                built = build(n, url, txt, folded=args.prefolded, storage_options=storage_options)
            _log.info("N=%d built: %s", n, built)
            row = {"n": n, "s3": args.s3, "prefolded": args.prefolded, "build": built, "steps": []}
            phase = "folded" if args.prefolded else "parts"
            for step in args.steps:
                r = run_steps(n, url, txt, args.code, env, [step])[step]
                row["steps"].append({"phase": phase, "step": step, **r})
                if step == "compact":
                    phase = "folded"
            results.append(row)
            print(json.dumps(row))
            if not (args.keep or args.reuse):
                shutil.rmtree(local, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
