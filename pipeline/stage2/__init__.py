"""Stage 2 of DVT: one Transformer block that maps raw ViT features to stage-1 clean features, for any image.

* :mod:`.denoiser`: the model, its file format (safetensors + spec) and :class:`DenoisedViT` (ViT + denoiser).
* :mod:`.pairs`: the (raw, clean) training pairs of feature stores as rows the trainers read.
* :mod:`.train_worker`: the Ray Train loop each worker runs.
* :mod:`.train`: ``dvt train`` on the driver (stores, splits, step budget, export).
* :mod:`.apply`: ``dvt apply``: ViT + denoiser over a corpus into a feature store.

Imports :mod:`pipeline.vit`, :mod:`pipeline.store`, :mod:`pipeline.runtime` and :mod:`pipeline.io`.
"""

from .apply import ApplyConfig, run_apply
from .denoiser import DenoisedViT, Denoiser, DenoiserConfig, DenoiserSpec, load_denoiser, read_spec, save_denoiser
from .train import TrainConfig, TrainSummary, run_training

__all__ = ["ApplyConfig", "run_apply", "DenoisedViT", "Denoiser", "DenoiserConfig", "DenoiserSpec", "load_denoiser",
           "read_spec", "save_denoiser", "TrainConfig", "TrainSummary", "run_training"]
