"""Old import path of :mod:`pipeline.vit.backbone`, kept for one release because the README showed it."""

import warnings

from .vit.backbone import *  # noqa: F401,F403
from .vit.backbone import __all__  # noqa: F401

warnings.warn("pipeline.backbone moved to pipeline.vit.backbone; import from there", FutureWarning, stacklevel=2)
