"""The evaluation harness: the DVT paper's measurements, runnable on feature stores and models.

Modules, one concept each:

* :mod:`.mic`: the maximal information coefficient (ApproxMaxMI, Reshef et al. 2011), batched;
* :mod:`.position_mic`: the paper's artifact measure, MIC between feature channels and patch coordinates;
* :mod:`.knn`: KNN segmentation (nearest-neighbour label transfer);
* :mod:`.seg_probe`, :mod:`.depth_probe`: the linear probes (reference protocol and frozen-feature form),
  with :mod:`.augment`, :mod:`.probe_data`, :mod:`.training` and :mod:`.seg_metrics` beneath them;
* :mod:`.lost`: LOST object discovery and CorLoc;
* :mod:`.datasets`: VOC 2012, ADE20k, NYUv2 and VOC box readers;
* :mod:`.sources`: what a report column is (a store array or a model);
* :mod:`.harness`: runs the measures; :mod:`.side_by_side`: writes the report (Markdown, JSON, PNG).

``dvt eval`` (``jobs/eval.py``) is the command line; docs/evaluation.md is the reproduction recipe.
"""

from .harness import EvalConfig, run_evaluation
from .side_by_side import write_report
from .sources import FeatureSource, parse_source

__all__ = ["EvalConfig", "run_evaluation", "write_report", "FeatureSource", "parse_source"]
