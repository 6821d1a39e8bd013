"""Stage 3 of DVT: distil ViT + denoiser into the ViT itself, on Ray Train.

* :mod:`.student`: student and teacher, which blocks train, the export (a timm-loadable state dict).
* :mod:`.pixels`: the image stream (decoded, resized, flipped) the student learns from.
* :mod:`.distill`: ``dvt distill`` (driver and worker loop).

Imports :mod:`pipeline.stage2` (the teacher's denoiser), :mod:`pipeline.vit`, :mod:`pipeline.runtime`,
:mod:`pipeline.io`.
"""

from .distill import DistillConfig, DistillSummary, run_distillation
from .student import load_student

__all__ = ["DistillConfig", "DistillSummary", "run_distillation", "load_student"]
