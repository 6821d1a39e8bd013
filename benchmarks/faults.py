"""Faults and hostile inputs, job by job: what a user sees (exit status, lines on the console, the last line, the
time it took) and what the store holds afterwards.

Each case runs ``python -m jobs.denoise`` (or ``jobs.store``) as a user would, in a fresh process with its own
local Ray, against a checkout given by ``--checkout`` (default: this one), so the same cases measure an older
commit too::

    git clone -q . /tmp/dvt-old && git -C /tmp/dvt-old checkout -q <commit>
    python benchmarks/faults.py --checkout /tmp/dvt-old > before.md
    python benchmarks/faults.py > after.md

Stores are read with plain zarr and pyarrow (the documented format), never through the checkout's code. S3 cases
start their own moto servers on 127.0.0.1 (a stalled store is a server frozen with SIGSTOP, a lost one a server
killed mid-run). Every process a case starts is stopped by its process id when the case ends.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.object_store import MotoServer, free_port  # noqa: E402

PY = sys.executable
TINY = ["--model", "vit_small_patch14_dinov2", "--input-size", "56", "--preset", "ci", "--views", "4",
        "--steps", "10", "--images-per-batch", "1", "--cpus-per-worker", "0.5", "--progress-every", "2"]
KEY = {"AWS_ACCESS_KEY_ID": "dvt-faults-key", "AWS_SECRET_ACCESS_KEY": "dvt-faults-secret",
       "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------------------------------------ processes

class Moto(MotoServer):
    """A moto S3 server of this case's own (so freezing or killing it touches nothing else), with a bucket."""

    def __init__(self) -> None:
        super().__init__()
        self.fs("mkdir", "bucket")

    def fs(self, method: str, *args):
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEY["AWS_ACCESS_KEY_ID"],
                               secret=KEY["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                               use_listings_cache=False, config_kwargs={"connect_timeout": 2, "read_timeout": 5,
                                                                        "retries": {"max_attempts": 1}})
        return getattr(fs, method)(*args)


@dataclass
class Run:
    rc: int | None
    seconds: float
    stderr: str
    killed: bool = False

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def last(self) -> str:
        return self.lines[-1] if self.lines else ""


class Job:
    """One ``python -m jobs.NAME`` process with its own Ray temp dir, stderr collected by a thread."""

    def __init__(self, checkout: Path, args: list[str], env: dict[str, str], ray_dir: str):
        self.ray_dir = ray_dir
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PY, "-m", *args], cwd=checkout, env={**env, "RAY_TMPDIR": ray_dir},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.out: list[str] = []
        self.times: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.out.append(raw.decode(errors="replace"))
            self.times.append(time.monotonic())

    def wait(self, timeout: float) -> Run:
        killed = False
        try:
            self.proc.wait(timeout=max(0.1, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            killed = True
            self.kill()
        self._reader.join(timeout=10)
        return Run(None if killed else self.proc.returncode, time.monotonic() - self.started, "".join(self.out),
                   killed)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def lines_after(self, t: float) -> int:
        return sum(1 for when in self.times if when > t)


def ray_pids(marker: str) -> list[int]:
    """Processes whose command line or environment mentions ``marker`` (this case's own Ray temp dir; Ray's
    workers rewrite their command lines, so the environment they inherited is what names them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def stop_ray(marker: str) -> None:
    for pid in ray_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------------ stores

def read_store(url: str, endpoint: str | None = None) -> dict:
    """Counts and attributes of a store, read with zarr and pyarrow only (None values when absent)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    opts = {"endpoint_url": endpoint, "key": KEY["AWS_ACCESS_KEY_ID"], "secret": KEY["AWS_SECRET_ACCESS_KEY"],
            "skip_instance_cache": True, "use_listings_cache": False} if url.startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(url, **opts)
    if not fs.exists(f"{path}/zarr.json"):
        return {"exists": fs.exists(path), "ok": None, "failed": None, "attrs": {}}
    attrs = dict(zarr.open_group(url, mode="r", storage_options=opts or None).attrs)
    parts = [p for p in fs.find(f"{path}/manifest/parts") if p.endswith(".parquet")]
    rows: dict[int, str] = {}
    for p in parts:
        for r in pq.read_table(pa.BufferReader(fs.cat_file(p))).to_pylist():
            if rows.get(r["image_id"]) != "ok":
                rows[r["image_id"]] = r["status"]
    ok = sum(s == "ok" for s in rows.values())
    return {"exists": True, "ok": ok, "failed": len(rows) - ok, "attrs": attrs, "fs": fs, "path": path,
            "statuses": rows}


def raw_row(url: str, row: int) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(url, mode="r")["raw"][row], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ cases

@dataclass
class Ctx:
    checkout: Path
    work: Path
    env: dict[str, str]
    samples: Path
    weights: Path
    stall_limit: float = 300.0
    n: int = 0

    def job(self, *args: str, env: dict[str, str] | None = None) -> Job:
        self.n += 1
        return Job(self.checkout, list(args), {**self.env, **(env or {})}, f"/tmp/dvtf{os.getpid() % 10000}-{self.n}")

    def run(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
        job = self.job(*args, env=env)
        try:
            return job.wait(timeout)
        finally:
            stop_ray(job.ray_dir)

    def denoise(self, output: str, *extra: str, timeout: float = 300, env: dict[str, str] | None = None,
                images: str | None = None) -> Run:
        return self.run("jobs.denoise", "--images", images or str(self.samples), "--output", output, *TINY, *extra,
                        timeout=timeout, env=env)


def _summary(run: Run) -> str:
    last = run.last if len(run.last) < 160 else run.last[:157] + "..."
    status = "killed" if run.killed else f"rc {run.rc}"
    return f"{status}, {len(run.lines)} lines, {run.seconds:.0f} s; last: `{_md(last)}`"


def _md(text: str) -> str:
    text = re.sub(r"^\d\d:\d\d:\d\d ", "", text).replace("|", "\\|").replace("`", "'")
    return text


def case_weights_mix(c: Ctx) -> str:
    out = str(c.work / "mix.zarr")
    c.denoise(out, "--weights", "none", "--limit", "2")
    second = c.denoise(out, "--weights", str(c.weights), "--limit", "4")
    s = read_store(out)
    return f"2nd run {_summary(second)}; store: {s['ok']} ok"


def case_random_weights(c: Ctx) -> str:
    a, b = str(c.work / "rand-a.zarr"), str(c.work / "rand-b.zarr")
    c.denoise(a, "--weights", "none", "--limit", "1")
    c.denoise(b, "--weights", "none", "--limit", "1")
    diff = float(np.abs(raw_row(a, 0) - raw_row(b, 0)).max())
    return f"max abs difference of raw row 0 between two identical runs: {diff:.3g}"


def case_seed_change(c: Ctx) -> str:
    out = str(c.work / "seed.zarr")
    c.denoise(out, "--weights", "none", "--limit", "1")
    second = c.denoise(out, "--weights", "none", "--limit", "2", "--seed", "1")
    return f"2nd run (--seed 1) {_summary(second)}"


def case_steps_change(c: Ctx) -> str:
    out = str(c.work / "steps.zarr")
    c.denoise(out, "--weights", "none", "--limit", "1")
    second = c.denoise(out, "--weights", "none", "--limit", "2", "--steps", "20")
    error = next((line for line in second.lines if " ERROR " in line), "")
    return (f"2nd run (--steps 20) rc {second.rc}; error line {len(error)} characters, names 'steps: ': "
            f"{'yes' if 'steps: ' in error or 'steps ' in error.split('differ')[-1][:200] else 'no'}")


def _wait_for_part(job: Job, moto: Moto | None, local: Path | None, timeout: float = 240) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            raise RuntimeError("the job ended before its first unit: " + "".join(job.out)[-2000:])
        try:
            if moto is not None:
                if moto.fs("find", "bucket/s.zarr/manifest/parts"):
                    return time.monotonic()
            elif local is not None and local.exists() and any(local.iterdir()):
                return time.monotonic()
        except (OSError, FileNotFoundError):
            pass
        time.sleep(0.2)
    raise RuntimeError("no unit was committed in time")


def case_stall(c: Ctx) -> str:
    moto = Moto()
    try:
        env = {**KEY, "AWS_ENDPOINT_URL_S3": moto.endpoint}
        job = c.job("jobs.denoise", "--images", str(c.samples), "--output", "s3://bucket/s.zarr", *TINY,
                    "--weights", "none", "--limit", "5", "--steps", "1500", env=env)
        t = _wait_for_part(job, moto, None)
        os.kill(moto.proc.pid, signal.SIGSTOP)
        run = job.wait(c.stall_limit + (t - job.started))
        stop_ray(job.ray_dir)
        after = job.lines_after(t)
        os.kill(moto.proc.pid, signal.SIGCONT)
        s = read_store("s3://bucket/s.zarr", moto.endpoint)
        ended = (f"still running {c.stall_limit:.0f} s after the freeze (killed)" if run.killed else
                 f"rc {run.rc} {run.seconds - (t - job.started):.0f} s after the freeze")
        warn = [line for line in run.lines[-after:] if "WARNING" in line or "ERROR" in line] if after else []
        return (f"{ended}; {after} lines after the freeze ({len(warn)} warnings/errors); last: "
                f"`{_md(run.last[:150])}`; store after SIGCONT: {s['ok']} ok, readable")
    finally:
        moto.stop()


def case_s3_resume(c: Ctx) -> str:
    moto = Moto()
    try:
        env = {**KEY, "AWS_ENDPOINT_URL_S3": moto.endpoint}
        c.denoise("s3://bucket/y.zarr", "--weights", "none", "--limit", "2", env=env)
        second = c.denoise("s3://bucket/y.zarr", "--weights", "none", "--limit", "4", env=env)
        summary = next((line for line in second.lines if re.search(r"store s3://\S+: \d+ ok", line)), "")
        warnings = sum("could not be read" in line for line in second.lines)
        s = read_store("s3://bucket/y.zarr", moto.endpoint)
        last_run = s["attrs"].get("last_run", {})
        return (f"summary `{_md(summary.strip())}`; last_run.store_ok={last_run.get('store_ok')}; "
                f"{warnings} 'could not be read' warnings; store holds {s['ok']} ok")
    finally:
        moto.stop()


def _refused(c: Ctx, name: str, *extra: str, env: dict[str, str] | None = None) -> str:
    out = c.work / f"{name}.zarr"
    run = c.denoise(str(out), "--limit", "2", *extra, env=env)
    s = read_store(str(out))
    left = "no store" if not s["exists"] else f"store left: {s['ok']} ok, {s['failed']} failed"
    return f"{_summary(run)}; {left}"


def case_garbage_weights(c: Ctx) -> str:
    bad = c.work / "garbage.safetensors"
    bad.write_bytes(b"this is not a weights file" * 10)
    return _refused(c, "garbage", "--weights", str(bad))


def case_missing_weights(c: Ctx) -> str:
    return _refused(c, "missing", "--weights", str(c.work / "no-such-file.safetensors"))


def case_hub_offline(c: Ctx) -> str:
    out = c.work / "hub.zarr"
    run = c.run("jobs.denoise", "--images", str(c.samples), "--output", str(out), *TINY[2:], "--model",
                "vit_small_patch14_dinov2.lvd142m", "--weights", "hub", "--limit", "2")
    s = read_store(str(out))
    return f"{_summary(run)}; {'no store' if not s['exists'] else 'store left'}"


def case_unreachable(c: Ctx) -> str:
    env = {**KEY, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}
    run = c.run("jobs.store", "info", "s3://bucket/x.zarr", env=env, timeout=300)
    return _summary(run)


def _interrupt(c: Ctx, name: str, how: Callable[[Job, Moto | None], None], s3: bool) -> str:
    moto = Moto() if s3 else None
    try:
        out = "s3://bucket/s.zarr" if s3 else str(c.work / f"{name}.zarr")
        env = {**KEY, "AWS_ENDPOINT_URL_S3": moto.endpoint} if moto else {}
        job = c.job("jobs.denoise", "--images", str(c.samples), "--output", out, *TINY, "--weights", "none",
                    "--limit", "5", "--steps", "1500", env=env)
        t = _wait_for_part(job, moto, None if s3 else c.work / f"{name}.zarr" / "manifest" / "parts")
        how(job, moto)
        run = job.wait(240 + (t - job.started))
        lingering = len(ray_pids(job.ray_dir))
        stop_ray(job.ray_dir)
        text = f"{_summary(run)}; {run.seconds - (t - job.started):.0f} s after the fault"
        if not s3:
            s = read_store(out)
            text += f"; store: {s['ok']} ok, readable; {lingering} Ray processes left at exit"
        return text
    finally:
        if moto:
            moto.stop()


def case_server_lost(c: Ctx) -> str:
    def kill(job: Job, moto: Moto | None) -> None:
        moto.proc.kill()
        moto.proc.wait()
    return _interrupt(c, "lost", kill, s3=True)


def case_sigint(c: Ctx) -> str:
    return _interrupt(c, "sigint", lambda job, _: os.kill(job.proc.pid, signal.SIGINT), s3=False)


def case_sigterm(c: Ctx) -> str:
    return _interrupt(c, "sigterm", lambda job, _: os.kill(job.proc.pid, signal.SIGTERM), s3=False)


def case_input_size(c: Ctx) -> str:
    return _refused(c, "size100", "--weights", "none", "--input-size", "100")


def case_views0(c: Ctx) -> str:
    return _refused(c, "views0", "--weights", "none", "--views", "0")


def case_workers0(c: Ctx) -> str:
    return _refused(c, "workers0", "--weights", "none", "--workers", "0")


def case_batch0(c: Ctx) -> str:
    return _refused(c, "batch0", "--weights", "none", "--images-per-batch", "0")


def case_limit0(c: Ctx) -> str:
    return _refused(c, "limit0", "--weights", "none", "--limit", "0")


def case_odd_images(c: Ctx) -> str:
    from PIL import Image

    folder = c.work / "odd"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (5, 3, 3), np.uint8)).save(folder / "tiny-3x5.png")
    Image.fromarray(rng.integers(0, 255, (40, 2000, 3), np.uint8)).save(folder / "strip-2000x40.jpg")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    (folder / "no-extension").write_bytes(buf.getvalue())
    out = str(c.work / "odd.zarr")
    run = c.denoise(out, "--weights", "none", images=str(folder))
    s = read_store(out)
    mentions = "mentioned" if any("no-extension" in line or "skipp" in line.lower() for line in run.lines) else \
        "not mentioned"
    uris = []
    if s["exists"]:
        import pyarrow.parquet as pq

        uris = pq.read_table(f"{out}/manifest/listing.parquet")["uri"].to_pylist()
    states = {Path(u).name: s["statuses"].get(i, "pending") for i, u in enumerate(uris)}
    return (f"rc {run.rc}; listed {len(uris)} of 3 files; " + ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))
            + f"; file without extension {'listed' if 'no-extension' in states else 'skipped, ' + mentions}")


def case_two_writers(c: Ctx) -> str:
    out = c.work / "two.zarr"
    # ~20 s per image: the first job is still running when the second one starts
    first = c.job("jobs.denoise", "--images", str(c.samples), "--output", str(out), *TINY, "--weights", "none",
                  "--limit", "5", "--steps", "8000")
    _wait_for_part(first, None, out / "manifest" / "parts")
    second = c.run("jobs.denoise", "--images", str(c.samples), "--output", str(out), *TINY, "--weights", "none",
                   "--limit", "5", "--steps", "8000")
    a = first.wait(400)
    stop_ray(first.ray_dir)
    done = [m.group(1) if m else "?" for run in (a, second) for m in [re.search(r"finished: (\d+) ok", run.stderr)]]
    s = read_store(str(out))
    return (f"1st rc {a.rc}, 2nd {_summary(second)}; images computed by the 1st / 2nd run: {done[0]} / {done[1]}, "
            f"store holds {s['ok']} ok of 5")


def case_typo_weights(c: Ctx) -> str:
    out = str(c.work / "typo.zarr")
    c.denoise(out, "--weights", "none", "--limit", "1")
    before = read_store(out)["attrs"].get("last_run", {})
    run = c.denoise(out, "--weights", str(c.work / "wieghts.safetensors"), "--limit", "1")
    after = read_store(out)["attrs"].get("last_run", {})
    return f"rc {run.rc}; last_run {'rewritten' if before != after else 'unchanged'}"


def case_sigkill_linger(c: Ctx) -> str:
    out = c.work / "sigkill.zarr"
    job = c.job("jobs.denoise", "--images", str(c.samples), "--output", str(out), *TINY, "--weights", "none",
                "--limit", "5", "--steps", "1500")
    _wait_for_part(job, None, out / "manifest" / "parts")
    os.kill(job.proc.pid, signal.SIGKILL)
    job.proc.wait()
    t = time.monotonic()
    counts = [len(ray_pids(job.ray_dir))]
    while ray_pids(job.ray_dir) and time.monotonic() - t < 300:
        time.sleep(1)
    gone = time.monotonic() - t
    left = len(ray_pids(job.ray_dir))
    stop_ray(job.ray_dir)
    return (f"{counts[0]} Ray processes at the kill; " +
            (f"all gone after {gone:.0f} s" if not left else f"{left} still there after {gone:.0f} s"))


def case_core_worker_line(c: Ctx) -> str:
    run = c.denoise(str(c.work / "plain.zarr"), "--weights", "none", "--limit", "1")
    errors = [line for line in run.lines if "core_worker.cc" in line]
    return f"rc {run.rc}; {len(errors)} core_worker.cc lines; {len(run.lines)} lines in all"


CASES = [
    ("1 weights mix", "`--weights none --limit 2`, then `--weights w.safetensors --limit 4`", case_weights_mix),
    ("1 random weights", "`--weights none` twice, same settings, two stores", case_random_weights),
    ("1 seed change", "`--limit 1`, then `--limit 2 --seed 1`", case_seed_change),
    ("1 steps change", "`--limit 1`, then `--limit 2 --steps 20`", case_steps_change),
    ("2 stalled S3", "S3 server frozen (SIGSTOP) after the first part", case_stall),
    ("3 S3 resume", "`--output s3://... --limit 2`, then `--limit 4`", case_s3_resume),
    ("4 garbage weights", "`--weights garbage.safetensors`", case_garbage_weights),
    ("4 missing weights", "`--weights no-such-file.safetensors`", case_missing_weights),
    ("4 hub offline", "`--weights hub` with HF_HUB_OFFLINE=1", case_hub_offline),
    ("4 unreachable", "`dvt store info s3://...` with nothing listening at the endpoint", case_unreachable),
    ("4 server lost", "S3 server killed after the first part", case_server_lost),
    ("4 SIGINT", "SIGINT to the job after the first part", case_sigint),
    ("4 SIGTERM", "SIGTERM to the job after the first part", case_sigterm),
    ("5 input size", "`--input-size 100` (patch 14), new output", case_input_size),
    ("5 views 0", "`--views 0`, new output", case_views0),
    ("5 workers 0", "`--workers 0`", case_workers0),
    ("5 batch 0", "`--images-per-batch 0`", case_batch0),
    ("5 limit 0", "`--limit 0`", case_limit0),
    ("6 odd images", "3x5 PNG, 2000x40 JPEG, PNG without extension", case_odd_images),
    ("7 two writers", "a second job on the store while the first runs", case_two_writers),
    ("7 typo weights", "finished store, then `--weights wieghts.safetensors`", case_typo_weights),
    ("also SIGKILL", "driver SIGKILLed after the first part: its local Ray's processes", case_sigkill_linger),
    ("also core_worker", "error-level core_worker.cc lines in a normal run", case_core_worker_line),
]


def make_weights(path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True,
                              img_size=56)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="repository to test (default: this one)")
    parser.add_argument("--cases", default="", help="comma-separated prefixes of case names (default: all)")
    parser.add_argument("--stall-limit", type=float, default=300.0, help="seconds to wait on a stalled job")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "DVT_"))}
    env.update(HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(checkout), **KEY)
    commit = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="dvt-faults-") as tmp:
        work = Path(tmp)
        weights = work / "w.safetensors"
        make_weights(weights)
        ctx = Ctx(checkout=checkout, work=work, env=env, samples=checkout / "pipeline" / "samples", weights=weights,
                  stall_limit=args.stall_limit)
        wanted = [p.strip() for p in args.cases.split(",") if p.strip()]
        print(f"checkout: {checkout} ({commit})\n")
        print("| case | what | result |\n| --- | --- | --- |")
        for name, what, fn in CASES:
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            started = time.monotonic()
            try:
                result = fn(ctx)
            except Exception as e:  # noqa: BLE001 - a case that cannot run is reported, not fatal
                result = f"case failed: {type(e).__name__}: {str(e)[:300]}"
            print(f"| {name} | {what} | {result} |", flush=True)
            print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
