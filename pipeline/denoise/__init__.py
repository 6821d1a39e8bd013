"""``dvt denoise``: a corpus in, a feature store of clean features out, by one of four methods.

* :mod:`.job`: the job (configuration, checks, the stage-1 worker) on the shared image-job runtime.
* :mod:`.methods`: the method registry (``dvt``, ``average``, ``bias``, ``denoiser``) and their settings.
* :mod:`.average`, :mod:`.bias`: the two cheap methods; :mod:`.method_worker` runs them.

Imports :mod:`pipeline.stage1` (``dvt``), :mod:`pipeline.stage2` (``denoiser`` is ``dvt apply``), and the
lower wings. Nothing below imports it.
"""

from .job import DenoiseConfig, DenoiseSummary, Stage1Worker, run_denoise

__all__ = ["DenoiseConfig", "DenoiseSummary", "Stage1Worker", "run_denoise"]
