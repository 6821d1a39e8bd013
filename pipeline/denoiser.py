"""Old import path of :mod:`pipeline.stage2.denoiser`, kept for one release because the README showed it."""

import warnings

from .stage2.denoiser import *  # noqa: F401,F403
from .stage2.denoiser import __all__  # noqa: F401

warnings.warn("pipeline.denoiser moved to pipeline.stage2.denoiser; import from there", FutureWarning, stacklevel=2)
