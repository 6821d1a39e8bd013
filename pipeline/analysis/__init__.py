"""Looking at features: artifact metrics, feature maps of stores and models, and the PNG panels of ``dvt show``.

* :mod:`.metrics`: positional energy, grid energy, cross-view consistency, PCA.
* :mod:`.feature_maps`: raw / stage-1 / denoised maps for a few images, from a store or from models.
* :mod:`.panels`: PCA, K-means and norm panels as PNGs.
* :mod:`.chain`: the whole chain (stage 1 -> 2 -> 3) measured on a ViT with a real positional artifact.

The top floor beside :mod:`pipeline.eval`: it may import every other wing.
"""
