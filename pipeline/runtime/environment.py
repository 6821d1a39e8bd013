"""What this installation is: package versions, compute devices, and the storage endpoint in use."""

from __future__ import annotations

import importlib.metadata
import os
import platform

__all__ = ["environment_info", "format_info"]

PACKAGES = ("dvt-pipeline", "torch", "torchvision", "timm", "ray", "pyarrow", "fsspec", "s3fs", "zarr", "numpy")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_info() -> dict:
    """Versions and devices as a plain dict (also written into stores' attributes)."""
    import torch

    from ..io.storage import s3_endpoint

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    devices.append(f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "devices": devices,
        "default_device": "cuda" if torch.cuda.is_available() else "cpu",
        "s3_endpoint": s3_endpoint() or "AWS default",
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE") == "1",
    }


def format_info(info: dict) -> str:
    lines = [f"python        {info['python']} on {info['platform']}"]
    lines += [f"{name:<13} {version}" for name, version in info["packages"].items()]
    lines += [f"device        {d}" for d in info["devices"]]
    lines += [f"default       {info['default_device']}", f"s3 endpoint   {info['s3_endpoint']}"]
    return "\n".join(lines)
