"""The ViT side of every stage: backbones, their weights, and the views stage 1 shows them.

* :mod:`.backbone`: timm ViTs (or your own ``module:factory``) behind one ``features(pixels)`` interface.
* :mod:`.weights`: which weights a job uses (hub tag, local file, seeded random) and their identity.
* :mod:`.views`: random resized crops with flips, made on the device, with the exact global coordinate of
  every patch centre.

Imports :mod:`pipeline.io` only.
"""

from .backbone import (DEFAULT_MODEL, RANDOM_WEIGHTS_SEED, Backbone, BackboneConfig, BackboneError, FeatureBackbone,
                       create_backbone, describe_backbone, load_state_dict)
from .views import ViewConfig, Views, grid_shape, make_views, patch_coords, render_views, sample_boxes
from .weights import check_weights, file_sha256, weights_identity

__all__ = ["DEFAULT_MODEL", "RANDOM_WEIGHTS_SEED", "Backbone", "BackboneConfig", "BackboneError", "FeatureBackbone",
           "create_backbone", "describe_backbone", "load_state_dict", "ViewConfig", "Views", "grid_shape",
           "make_views", "patch_coords", "render_views", "sample_boxes", "check_weights", "file_sha256",
           "weights_identity"]
