"""What checks the method and the pipeline without real models or cloud storage, for users and tests alike.

* :mod:`.artifact_vit`: a timm ViT with a real positional artifact, importable by jobs as ``--model module:factory``.
* :mod:`.synthetic`: a synthetic backbone whose features have a known clean part and artifact, to score stage 1.
* :mod:`.synthetic_pairs`: feature stores of (raw, clean) pairs with a learnable relation, to check stage 2.
* :mod:`.zero_vit`: a backbone with ViT-B/14's shapes that costs nothing, to measure the machinery around the model.
* :mod:`.zero_denoiser`: ``dvt apply``'s worker with the denoiser's block made the identity, for the same purpose.
* :mod:`.object_store`: a local S3-compatible server (moto) on 127.0.0.1.
* :mod:`.cluster`: a multi-node Ray cluster on this machine, with nodes killed and added mid-run.

May import every wing but ``stage3``, ``denoise``, ``analysis`` and ``eval`` (``tests/infra/test_wings.py``).
"""
