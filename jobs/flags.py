"""Flag groups shared by the jobs, so that the same option is spelt, defaulted and explained the same everywhere."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from pipeline.vit.backbone import DEFAULT_MODEL
from pipeline.io.decode import DecodeConfig
from pipeline.runtime.checks import parse_workers
from pipeline.denoise.methods import METHODS
from pipeline.denoise.average import AverageConfig

__all__ = ["SAMPLES", "DEFAULT_MODEL", "add_dashboard_argument", "add_images_argument", "add_store_arguments",
           "add_worker_arguments", "add_trainer_arguments", "add_amp_argument", "add_method_arguments", "config_from_args", "image_job_config"]

#: The sample images bundled with the package: what a job reads when no ``--images`` is given.
SAMPLES = str(Path(__file__).resolve().parents[1] / "pipeline" / "samples")
#: Namespace entries of the command line itself, not of any job.
CLI_ENTRIES = frozenset({"verbose", "command", "_run"})

C = TypeVar("C")


def add_dashboard_argument(group: argparse._ArgumentGroup) -> None:
    """The ``--dashboard`` flag of the jobs that start Ray."""
    group.add_argument("--dashboard", action="store_true",
                       help="start Ray's dashboard with a local Ray (a cluster has its own; off by default to "
                            "leave the CPUs to the workers)")


def add_images_argument(group: argparse._ArgumentGroup, *, keep_columns: bool = True) -> None:
    """``--images``: what a job reads (default: the bundled samples); ``--image-column`` for Parquet shards and,
    with ``keep_columns``, ``--keep-columns`` (shard fields carried into the store's listing)."""
    group.add_argument("--images", default=SAMPLES,
                       help="folder, glob, s3:// prefix, or .txt/.csv/.parquet list of image URIs (default: bundled "
                            "samples); or shards: WebDataset .tar or Parquet files with image bytes, as a file, a "
                            "folder or prefix, a glob or a brace pattern such as s3://bucket/shards/{00000..09999}.tar")
    group.add_argument("--image-column", default="jpg",
                       help="Parquet shards: the column holding the encoded images (default jpg, as img2dataset "
                            "writes); tar shards: the preferred member extension")
    if keep_columns:
        group.add_argument("--keep-columns", default="",
                           help="shard fields to carry into the store's listing, comma-separated (e.g. "
                                "key,url,caption): Parquet columns, or tar members KEY.NAME / fields of KEY.json")


def add_store_arguments(group: argparse._ArgumentGroup, *, changed: str) -> None:
    """Flags of every image-to-store job (``denoise``, ``apply``): which listed images to do and how to store them."""
    group.add_argument("--limit", type=int, default=None, help="only the first N images of the listing")
    group.add_argument("--overwrite", action="store_true", help="delete the store and redo every image")
    group.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                       help="skip images a previous run recorded as failed")
    group.add_argument("--allow-config-change", action="store_true", help=f"add to a store made with another {changed}")
    group.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="feature storage type")
    group.add_argument("--min-side", type=int, default=1,
                       help="refuse images with a shorter side (default: every image is used, stretched to the input)")
    group.add_argument("--max-aspect", type=float, default=None,
                       help="refuse images whose long/short side ratio is above this (default: no limit)")


def add_worker_arguments(parser: argparse.ArgumentParser, *, images_per_batch: str) -> None:
    """The ``resources`` group of every image-to-store job: images per unit (``images_per_batch`` says the job's
    default), the actor pool, and Ray when the job starts its own."""
    group = parser.add_argument_group("resources")
    group.add_argument("--images-per-batch", type=int, default=None, help=images_per_batch)
    group.add_argument("--workers", type=parse_workers, default=1,
                       help="number of workers (actors), or a range MIN-MAX (e.g. 2-16): an autoscaling pool that "
                            "also uses nodes joining while the job runs")
    group.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs")
    group.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 with a GPU, else a share")
    group.add_argument("--decode-tasks", type=int, default=None,
                       help="decode tasks at once (default: as many as the CPUs the workers leave free; beside GPU "
                            "workers one per free CPU; none when the workers decode, see --decode-threads)")
    group.add_argument("--decode-cpus", type=float, default=None,
                       help="CPUs each decode task holds (default: 1 beside GPU workers, else a share of the free CPUs)")
    group.add_argument("--decode-threads", type=int, default=None,
                       help="decode in each worker with this many threads instead of decode tasks (default: when the "
                            "workers leave fewer than 2 CPUs free, e.g. CPU workers, one thread per CPU a worker holds)")
    group.add_argument("--fast-decode", action="store_true",
                       help="decode JPEGs at least twice the input size at a reduced scale (PIL draft mode): faster on "
                            "large photos, slightly different pixels (off by default)")
    group.add_argument("--progress-every", dest="progress_every_s", type=float, default=30.0,
                       help="seconds between progress lines")
    add_dashboard_argument(group)


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``resources`` group of the Ray Train jobs (``train``, ``distill``): the fields of
    :class:`pipeline.runtime.ray_train.RunConfig`, spelt and defaulted the same for both."""
    group = parser.add_argument_group("resources")
    group.add_argument("--workers", type=parse_workers, default=1,
                       help="Ray Train workers (DDP ranks): a number (a MIN-MAX range is refused: the training loops "
                            "fix each worker's share of the batch at start)")
    group.add_argument("--gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                       help="one GPU per worker, or --no-gpu to train on CPUs (gloo); default: when the cluster has GPUs")
    group.add_argument("--cpu", dest="use_gpu", action="store_false", help=argparse.SUPPRESS)  # older spelling of --no-gpu
    group.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 with a GPU, else a share")
    group.add_argument("--read-threads", type=int, default=None,
                       help="reads at a time in each training worker (default: 2 per CPU of the worker, 4 to 16)")
    group.add_argument("--max-failures", type=int, default=3, help="worker failures recovered from checkpoints")
    add_dashboard_argument(group)


def add_amp_argument(group: argparse._ArgumentGroup) -> None:
    """``--amp``: autocast on the model (a GPU's bf16 units), for the jobs that run a backbone."""
    group.add_argument("--amp", choices=("bfloat16",), default=None,
                       help="autocast dtype for the model (default: fp32); bfloat16 runs several times faster on "
                            "GPUs at about 3 significant digits")


def config_from_args(config_class: type[C], args: argparse.Namespace, *, consumed: tuple[str, ...] = (),
                     **settings: Any) -> C:
    """A job config from its flags, one flag destination per field.

    Every destination must name a field (or be in ``consumed``: flags the caller turned into ``settings``), so a
    misspelt ``dest=`` fails here, naming it, instead of being dropped while its field keeps the default.
    """
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in vars(args).items() if k not in CLI_ENTRIES and k not in consumed}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TypeError(f"{config_class.__name__} has no field for the flag destination(s) {', '.join(unknown)}: "
                        f"fix the flag's dest= or add the field")
    return config_class(**values, **settings)


def image_job_config(config_class: type[C], args: argparse.Namespace) -> C:
    """:func:`config_from_args` for an image-to-store job: ``--min-side`` and ``--max-aspect`` become its decode
    limits."""
    return config_from_args(config_class, args, consumed=("min_side", "max_aspect"),
                            decode=DecodeConfig(min_side=args.min_side, max_aspect=args.max_aspect))


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """``dvt denoise``'s method flags: which method and its settings (fields of ``DenoiseConfig``)."""
    group = parser.add_argument_group("method (see README: which method when)")
    group.add_argument("--method", choices=METHODS, default="dvt",
                       help="dvt: stage 1 per image (default); average: shifted and flipped copies averaged; "
                            "bias: subtract a dataset-level artifact map (--artifact); denoiser: a trained "
                            "denoiser (--denoiser), as `dvt apply`")
    group.add_argument("--copies", type=int, default=AverageConfig.copies,
                       help=f"average: forward passes per image (default {AverageConfig.copies})")
    group.add_argument("--max-shift", type=float, default=AverageConfig.max_shift,
                       help=f"average: largest shift in patches (default {AverageConfig.max_shift:g})")
    group.add_argument("--artifact", default=None, help="bias: artifact file from `dvt artifact`")
    group.add_argument("--denoiser", default=None, help="denoiser: file from `dvt train`")
    group.add_argument("--compress", choices=("int8",), default=None,
                       help="keep features as int8 with per-image, per-channel scale and offset (about half the "
                            "bytes of float16; reads decode it). PCA: `dvt store convert`")
    group.add_argument("--upsample", type=int, choices=(1, 2, 4), default=1,
                       help="dvt: also store the clean field F on a grid 2 or 4 times finer (array clean_x2 or clean_x4)")
