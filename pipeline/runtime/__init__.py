"""What every job runs on: Ray start-up, the image-job runner, checks, failures, progress and Ray Train plumbing.

* :mod:`.plan`: one frozen :class:`ImageJobPlan` per image job, checked before Ray starts, and ``run_plan``.
* :mod:`.image_job`: the settings, summary and worker actors every image job (``dvt denoise``, ``dvt apply``) shares.
* :mod:`.job_runner`: the driver side: the store, the actor pool, the Ray Data pipeline, the ledger's folding.
* :mod:`.inputs`, :mod:`.feeding`, :mod:`.reachability`: what a job reads (files or shards), how its CPU side
  (decode tasks) is sized, and that every node sees its storage.
* :mod:`.checks`: shared flag checks, ``--limit 0``, the store session (lease) of a job.
* :mod:`.job_errors`: :class:`JobConfigError`, a refusal before any work (importable from every wing).
* :mod:`.failures`: exit statuses and the one-line reason a job stopped.
* :mod:`.progress`: images/s, ETA and stall warnings on the driver.
* :mod:`.ray_session`: starting and stopping Ray, locally or on a cluster.
* :mod:`.batching`: images per pass and per unit, from the device's memory.
* :mod:`.ray_train`: Ray Train plumbing shared by stages 2 and 3 (run records, checkpoints, the fit loop).
* :mod:`.fault_injection`: planned faults for tests. :mod:`.environment`: ``dvt info``.

Imports :mod:`pipeline.store` and :mod:`pipeline.io`; never a stage wing (stages import it).
"""
