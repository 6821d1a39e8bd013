"""Stage 3 models: the student (a trainable copy of the backbone), its teacher, their distance, and the export.

The teacher is a stage-2 denoiser file on top of the frozen backbone it names (:class:`DenoisedViT`); the
student starts as an exact copy of that backbone and is fine-tuned so that its own patch features, from the
same block, match the teacher's. :func:`export_student` writes the student as a plain timm checkpoint::

    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="student.safetensors"))

The file holds every key of the original checkpoint (the trunk as distilled, the classifier head if the
original weights had one, unchanged), and a JSON note in its safetensors metadata (also written beside it as
``student.json`` and ``student.md``): what it was distilled from, on how many images, for how many steps, and
the held-out distance to the teacher before and after. :func:`load_student` turns it back into a
:class:`Backbone` at the distillation size, which reproduces the student's features exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..vit.backbone import Backbone, BackboneConfig, create_backbone, load_state_dict
from ..stage2.denoiser import DenoisedViT, DenoiserSpec, load_denoiser

__all__ = ["NOTE_KEY", "parse_train_blocks", "select_trainable", "build_student_and_teacher", "distance_sums",
           "distance_from_sums", "export_student", "read_note", "load_student"]

_log = logging.getLogger(__name__)

#: Key of the JSON note in the exported file's safetensors metadata.
NOTE_KEY = "dvt_distilled"
READ_AHEAD_BYTES = re.compile(r"^blocks\.(\d+)\.")


def parse_train_blocks(spec: str, num_blocks: int, feature_block: int) -> list[int]:
    """Block indices named by ``spec``: ``all``, ``last:N`` (the N blocks ending at the feature block) or ``i,j,k``.

    Blocks after ``feature_block`` never change the distilled features, so naming one is an error.

    Raises:
        ValueError: on a malformed spec or an index outside ``0..feature_block``.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(feature_block + 1))
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--train-blocks {spec!r}: 'last:N' needs a positive integer N")
        return list(range(max(0, feature_block - n + 1), feature_block + 1))
    try:
        blocks = sorted({int(b) if int(b) >= 0 else num_blocks + int(b) for b in spec.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--train-blocks {spec!r}: pass 'all', 'last:N' or comma-separated block indices") from None
    bad = [b for b in blocks if not 0 <= b <= feature_block]
    if not blocks or bad:
        raise ValueError(f"--train-blocks {spec!r}: blocks must lie in 0..{feature_block} (the distilled block; later "
                         f"blocks do not change its features), got {bad or 'none'}")
    return blocks


def select_trainable(student: Backbone, train_blocks: str = "all") -> list[str]:
    """Set ``requires_grad`` on the student's parameters that ``train_blocks`` selects and that reach its features.

    The selected blocks and the final norm (when the features are normalised) are trainable; with ``all`` also
    the embeddings (patch, position, class and register tokens). A probe forward/backward on a 2 x 2 patch input
    then freezes whatever got no gradient (heads, pooling, blocks after the feature block), so DDP never waits
    for an unused parameter. Returns the trainable parameter names, in ``named_parameters`` order.
    """
    model = student.model
    if student.custom:
        if train_blocks.strip().lower() != "all":
            raise ValueError(f"custom backbone {student.name} has no numbered blocks: use --train-blocks all")
        chosen = None
    else:
        chosen = set(parse_train_blocks(train_blocks, student.num_blocks, student.block))
    everything = train_blocks.strip().lower() == "all"
    for name, p in model.named_parameters():
        m = READ_AHEAD_BYTES.match(name)
        if chosen is None:
            train = True
        elif m:
            train = int(m[1]) in chosen
        elif name.startswith(("norm.", "fc_norm.")) and student.config.norm:
            train = True
        else:
            train = everything
        p.requires_grad_(train)
    size = student.patch_size + student.stride
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no stochastic depth: a skipped block must not look unused
    student.features(torch.rand(1, 3, size, size, device=device)).square().sum().backward()
    model.train(was_training)
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        elif p.requires_grad:
            names.append(name)
        p.grad = None
    if not names:
        raise ValueError(f"--train-blocks {train_blocks!r} leaves nothing to train in {student.name}")
    return names


def build_student_and_teacher(denoiser: str, weights: str = "hub", input_size: int | None = None,
                              device: str | torch.device = "cpu") -> tuple[Backbone, DenoisedViT, DenoiserSpec]:
    """The student (trainable, train mode) and the frozen teacher, both starting from the same backbone weights.

    Args:
        denoiser: stage-2 denoiser file (local path or fsspec URL); it names the backbone, block and stride.
        weights: the backbone weights the denoiser was trained on: ``"hub"``, ``"none"`` or a local file.
        input_size: square training size (default: the size the denoiser was trained at).
    """
    den, spec = load_denoiser(denoiser, device="cpu")
    student = create_backbone(spec.backbone_config(weights, input_size))
    teacher_backbone = copy.deepcopy(student)  # same weights however they were made (also random ones)
    teacher = DenoisedViT(teacher_backbone, den, spec).to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    return student, teacher, spec


def distance_sums(student: Backbone | torch.nn.Module, teacher: DenoisedViT, batches: Iterable[torch.Tensor],
                  autocast: bool = False) -> list[float]:
    """``[mse_sum, cos_sum, images]`` of the student against the teacher over batches of pixels in ``[0, 1]``.

    Per image: the mean squared error over all feature values and the mean cosine over tokens. Sums (not means)
    so that workers can add theirs up; the distance is ``mse + 1 - cos`` of the means, the training loss.
    """
    sums = [0.0, 0.0, 0.0]
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for pixels in batches:
            device_type = pixels.device.type
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast and device_type == "cuda"):
                target = teacher.features(pixels)
                pred = student(pixels)
            pred, target = pred.float(), target.float()
            sums[0] += F.mse_loss(pred, target, reduction="none").flatten(1).mean(1).sum().item()
            sums[1] += F.cosine_similarity(pred, target, dim=-1).flatten(1).mean(1).sum().item()
            sums[2] += len(pixels)
    student.train(was_training)
    return sums


def distance_from_sums(sums: list[float]) -> dict[str, float]:
    """``{"mse", "cos", "distance", "images"}`` from :func:`distance_sums` (added over workers)."""
    n = sums[2]
    if n <= 0:
        return {}
    mse, cos = sums[0] / n, sums[1] / n
    return {"mse": mse, "cos": cos, "distance": mse + 1 - cos, "images": int(n)}


# ------------------------------------------------------------------------------------------------ export

def _original_extras(config: BackboneConfig, trunk: set[str]) -> dict[str, torch.Tensor]:
    """Weights of the original checkpoint that the headless student lacks (the classifier head), unchanged."""
    import timm

    kwargs: dict[str, Any] = dict(dynamic_img_size=True)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    if config.weights == "hub":
        full = timm.create_model(config.model, pretrained=True, **kwargs)
    else:
        torch.manual_seed(0)
        full = timm.create_model(config.model, pretrained=False, **kwargs)
        if config.weights != "none":
            state = load_state_dict(config.weights)
            filter_fn = getattr(__import__(type(full).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
            if filter_fn is not None:
                state = filter_fn(state, full)
            # What the file holds beyond the trunk; a headless file gives a headless export (num_classes=0).
            return {k: v for k, v in state.items() if k not in trunk}
    return {k: v for k, v in full.state_dict().items() if k not in trunk}


def export_student(student: Backbone, path: str, note: dict[str, Any], original_weights: str | None = None) -> str:
    """Write the student to ``path`` (local or fsspec URL) as a timm checkpoint, plus ``.json``/``.md`` notes.

    Args:
        student: the distilled backbone (its ``config.weights`` names the original weights).
        path: ``.safetensors`` destination.
        note: provenance (teacher file, images, steps, distances); the model settings are added here.
        original_weights: where the student's starting weights came from (``"hub"``, ``"none"``, a file), if
            not ``student.config.weights``; weights the student lacks (the classifier head) are copied from there.

    Returns:
        ``path``.
    """
    from safetensors.torch import save

    from ..io.storage import filesystem

    state = {k: v.detach().to("cpu").contiguous() for k, v in student.model.state_dict().items()}
    cfg = student.config
    if original_weights is not None:
        cfg = dataclasses.replace(cfg, weights=original_weights)
    if not student.custom:
        extras = _original_extras(cfg, set(state))
        state.update({k: v.detach().to("cpu").contiguous() for k, v in extras.items()})
        note = {**note, "extra_keys_from_original": sorted(extras)}
    note = {**note, "format": "dvt-distilled-student", "model": cfg.model, "img_size": cfg.img_size,
            "block": student.block, "stride": student.stride, "norm": cfg.norm, "original_weights": cfg.weights,
            "timm": None if student.custom else
            f"timm.create_model({cfg.model!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH), "
            f"img_size={cfg.img_size}, dynamic_img_size=True)"}
    text = json.dumps(note, indent=2, sort_keys=True, default=str)
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(p, save(state, metadata={NOTE_KEY: text}))
    stem = p.removesuffix(".safetensors")
    fs.pipe_file(f"{stem}.json", text.encode())
    fs.pipe_file(f"{stem}.md", _markdown(note, path).encode())
    _log.info("exported the student (%s, %d tensors) to %s", cfg.model, len(state), path)
    return path


def _markdown(note: dict[str, Any], path: str) -> str:
    before, after = note.get("before") or {}, note.get("after") or {}

    def fmt(d: dict[str, Any], k: str) -> str:
        return f"{d[k]:.4g}" if k in d else "-"

    return "\n".join([
        f"# Distilled {note['model']}", "",
        f"Student ViT fine-tuned so that its own block-{note['block']} patch features match "
        f"`{note.get('teacher')}` (the frozen backbone plus the stage-2 denoiser). No extra block is needed at "
        "inference.", "",
        f"- original weights: `{note['original_weights']}`",
        f"- training images: {note.get('num_train')}, steps: {note.get('steps')}, epochs: {note.get('epochs')}, "
        f"size {note['img_size']} px, trained blocks: {note.get('train_blocks')}",
        f"- held-out images: {after.get('images', before.get('images', 0))}", "",
        "| held-out distance to the teacher | MSE | cosine | MSE + 1 - cos |", "|---|---|---|---|",
        f"| before (the original backbone) | {fmt(before, 'mse')} | {fmt(before, 'cos')} | {fmt(before, 'distance')} |",
        f"| after (the student) | {fmt(after, 'mse')} | {fmt(after, 'cos')} | {fmt(after, 'distance')} |", "",
        "Load it with timm:", "", "```python", "import timm",
        (note.get("timm") or "").replace("PATH", repr(path)), "```", ""])


def read_note(path: str) -> dict[str, Any]:
    """The JSON note of an exported student file (from its safetensors metadata)."""
    import struct

    from ..io.storage import filesystem, storage_errors

    fs, p = filesystem(path)
    with storage_errors(path), fs.open(p, "rb") as f:  # the header only: no need to fetch the weights
        head = f.read(8)
        try:
            meta = json.loads(f.read(struct.unpack("<Q", head)[0])).get("__metadata__") or {}
        except (struct.error, ValueError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a safetensors file") from None
    if NOTE_KEY not in meta:
        raise ValueError(f"{path} is not a student exported by `dvt distill` (no {NOTE_KEY!r} metadata)")
    return json.loads(meta[NOTE_KEY])


def _local_copy(path: str, tmp: str) -> str:
    """``path`` itself when local, else a copy of it in the folder ``tmp``."""
    from ..io.storage import filesystem, is_local, local_path

    if is_local(path):
        return local_path(path)
    local = f"{tmp}/student.safetensors"
    fs, p = filesystem(path)
    fs.get_file(p, local)
    return local


def load_student(path: str, device: str | torch.device = "cpu") -> Backbone:
    """An exported student as a frozen :class:`Backbone` at its distillation size, loaded by timm itself (a custom
    backbone by its own factory, called with ``weights=<the student file>``)."""
    import timm

    note = read_note(path)
    if note.get("timm") is None:  # a custom backbone: its factory reads the file (``factory(weights=path)``)
        with tempfile.TemporaryDirectory() as tmp:
            local = _local_copy(path, tmp)
            config = BackboneConfig(model=note["model"], weights=local, block=int(note["block"]),
                                    stride=note["stride"], norm=bool(note["norm"]), img_size=note.get("img_size"))
            return create_backbone(config).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(path, tmp)
        kwargs: dict[str, Any] = dict(dynamic_img_size=True, pretrained_cfg_overlay=dict(file=local))
        if note.get("img_size"):
            kwargs["img_size"] = note["img_size"]
        if note.get("extra_keys_from_original"):  # strict load of the whole checkpoint, then drop the head
            model = timm.create_model(note["model"], pretrained=True, **kwargs)
            model.reset_classifier(0)
        else:
            model = timm.create_model(note["model"], pretrained=True, num_classes=0, **kwargs)
    config = BackboneConfig(model=note["model"], weights=path, block=int(note["block"]), stride=note["stride"],
                            norm=bool(note["norm"]), img_size=note.get("img_size"))
    return Backbone(model, config).to(device).eval().requires_grad_(False)
