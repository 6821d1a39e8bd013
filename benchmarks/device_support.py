"""What the parts of ``benchmarks/device_check.py`` share: the Ray/zarr archive for a machine without them, one
local Ray for every job, jobs as child processes with timeouts and logs, generated images, and GPU sampling."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.io.decode import resize_to_tensor

_log = logging.getLogger("device_check")
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "pipeline" / "samples").iterdir() if p.suffix in (".png", ".jpg"))
#: The run, its work folder, the shared Ray, and the child processes still running.
STATE: dict[str, Any] = {"children": set()}


# ------------------------------------------------------------------------------------------------ environment

def use_site_archive(arg: str, root: Path) -> str:
    """Unpack and use the Ray/zarr archive when they are missing here; returns what was done."""
    missing = [m for m in ("ray", "zarr") if not _importable(m)]
    if not missing:
        return "not needed: ray and zarr importable"
    if arg == "none":
        return f"not used ({', '.join(missing)} missing)"
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    path = Path(arg) if arg != "auto" else root / ".device" / f"site-{tag}.tar.xz"
    if not path.is_file():
        return f"{path} not found ({', '.join(missing)} missing): make it with infra/device_wheels.sh"
    target = Path(tempfile.gettempdir()) / "dvt-site"
    marker = target / f".from-{path.stat().st_size}"
    t0 = time.monotonic()
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(path) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")
            else:
                tar.extractall(target)
        marker.touch()
    sys.path.insert(1, str(target))
    # Subprocesses (jobs, Ray's workers, spawned kernels) find it through PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(target), os.environ.get("PYTHONPATH")]))
    still = [m for m in ("ray", "zarr") if not _importable(m)]
    return f"{path.name} unpacked to {target} in {time.monotonic() - t0:.1f} s" + (
        f"; still missing: {still}" if still else "")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> tuple[str | None, str | None]:
    out = []
    for name in ("ray", "zarr"):
        try:
            out.append(__import__(name).__version__)
        except Exception:  # noqa: BLE001 - absent or broken: reported as absent
            out.append(None)
    return out[0], out[1]


def ray_missing() -> str:
    """Why the Ray parts cannot run here ("" when they can)."""
    ray, zarr = versions()
    missing = [n for n, v in (("ray", ray), ("zarr", zarr)) if v is None]
    return f"skipped: {' and '.join(missing)} not installed" if missing else ""


def setup(run) -> None:
    STATE["run"] = run
    STATE["work"] = Path(tempfile.mkdtemp(prefix="dvt-device-check-"))
    (run.out / "logs").mkdir(parents=True, exist_ok=True)


def cleanup() -> None:
    stop_children()
    if STATE.get("ray"):
        import ray

        ray.shutdown()
    shutil.rmtree(STATE.get("work", ""), ignore_errors=True)


def shared_ray() -> dict[str, Any]:
    """Start one local Ray for every job of the run (jobs connect to it through ``RAY_ADDRESS``, as to a
    cluster, instead of each paying for a start and a shutdown); returns its resources."""
    import ray

    if not STATE.get("ray"):
        t0 = time.monotonic()
        # Workers import the project (and the unpacked site archive) through PYTHONPATH, as a cluster image would.
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            filter(None, [str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        context = ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        os.environ["RAY_ADDRESS"] = context.address_info["gcs_address"]
        STATE["ray"] = {"resources": ray.cluster_resources(), "start_s": round(time.monotonic() - t0, 1),
                         "address": os.environ["RAY_ADDRESS"]}
        _log.info("shared Ray at %s in %.1f s: %s", os.environ["RAY_ADDRESS"], time.monotonic() - t0,
                  STATE["ray"]["resources"])
        STATE["run"].report["environment"]["shared_ray"] = STATE["ray"]
    return STATE["ray"]


def stop_children() -> None:
    for proc in list(STATE["children"]):
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and the local Ray it started
        except ProcessLookupError:
            pass
    STATE["children"].discard(proc)


# ------------------------------------------------------------------------------------------------ images

def _source(i: int) -> Image.Image:
    """A distinct photo-like image for index ``i``: a random crop and flip of a bundled sample."""
    rng = np.random.default_rng(i)
    with Image.open(SAMPLES[i % len(SAMPLES)]) as im:
        im = im.convert("RGB")
    w, h = im.size
    f = rng.uniform(0.6, 1.0)
    cw, ch = int(w * f), int(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x, y, x + cw, y + ch))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def corpus_image(i: int, size: int) -> torch.Tensor:
    """Image ``i`` as the jobs see it: ``(3, size, size)`` in [0, 1]."""
    return resize_to_tensor(np.asarray(_source(i)), size)


def ensure_corpus(n: int) -> Path:
    """A folder of at least ``n`` generated JPEGs (640 px on the long side), made once and extended."""
    from concurrent.futures import ThreadPoolExecutor

    folder = STATE["work"] / "images"
    folder.mkdir(exist_ok=True)

    def make(i: int) -> None:
        im = _source(i)
        im.thumbnail((640, 640))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(make, range(len(list(folder.glob("*.jpg"))), n)))
    return folder


# ------------------------------------------------------------------------------------------------ measuring

class GpuSampler:
    """GPU utilisation and memory every 0.2 s, from ``nvidia-smi`` (else ``torch.cuda.utilization``)."""

    def __init__(self, device: torch.device):
        self.samples: list[tuple[float, float, float]] = []  # (unix time, util %, memory MiB)
        self.source = None
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        if device.type != "cuda":
            return
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200", "-i", str(torch.cuda.current_device())],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        else:
            try:
                torch.cuda.utilization()
                self.source = "torch.cuda.utilization"
                threading.Thread(target=self._poll, daemon=True).start()
            except Exception:  # noqa: BLE001 - no NVML: no sampling
                self.source = None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append((time.time(), float(torch.cuda.utilization()), float("nan")))

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def summary(self, window: tuple[float, float] | None = None) -> dict[str, Any] | None:
        if not self.source:
            return None
        s = [x for x in self.samples if window is None or window[0] <= x[0] <= window[1]]
        if not s:
            return {"source": self.source, "samples": 0}
        util = np.array([x[1] for x in s])
        memory = [x[2] for x in s if x[2] == x[2]]
        return {"source": self.source, "samples": len(s), "util_mean_pct": round(float(util.mean()), 1),
                "util_median_pct": float(np.median(util)), "memory_max_mib": max(memory) if memory else None}


def run_job(name: str, module: str, args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module args`` in its own process group; returns rc, wall seconds and the log's tail."""
    log = STATE["run"].out / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", module, *args]
    _log.info("%s: %s (timeout %.0f s)", name, " ".join(cmd[1:]), timeout)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        STATE["children"].add(proc)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill(proc)
    seconds = time.monotonic() - t0
    tail = log.read_text(errors="replace").splitlines()[-15:]
    result = {"rc": rc, "wall_s": round(seconds, 1), "log": str(log.relative_to(STATE["run"].out))}
    if rc is None:
        result["error"] = f"timed out after {timeout:.0f} s"
    elif rc not in (0,):
        result["error"] = f"exit status {rc}: " + " / ".join(tail[-4:])
    return result
