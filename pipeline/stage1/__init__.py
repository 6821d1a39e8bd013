"""Stage 1 of DVT, per image: ``ViT(t(x)) = F(global coords) + G(grid position) + h(raw features)``.

* :mod:`.view_features`: the backbone's features on many views of one image, with their global coordinates.
* :mod:`.field`: the fields ``F`` can be (hash grid + MLP as in the paper, or a dense grid) and grid sampling.
* :mod:`.noise_model`: ``F``, the artifact map ``G`` and the residual ``h``, their losses and the gauge.
* :mod:`.config`: :class:`Stage1Config` and the named presets (:data:`PRESETS`).
* :mod:`.fit`: the fit itself (closed form or Adam) and :func:`fit_images`.

Imports :mod:`pipeline.vit` only. The job that runs stage 1 over a corpus is :mod:`pipeline.denoise`.
"""

from .config import PRESETS, STAGE1_VERSION, Stage1Config
from .fit import Stage1Error, Stage1Result, fit_generator, fit_images, fit_views

__all__ = ["STAGE1_VERSION", "Stage1Config", "Stage1Error", "Stage1Result", "PRESETS", "fit_images", "fit_views",
           "fit_generator"]
