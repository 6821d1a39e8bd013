"""Old import path of :mod:`pipeline.stage3.student`, kept for one release because the README showed it."""

import warnings

from .stage3.student import *  # noqa: F401,F403
from .stage3.student import __all__  # noqa: F401

warnings.warn("pipeline.distill_model moved to pipeline.stage3.student; import from there", FutureWarning, stacklevel=2)
