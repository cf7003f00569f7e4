"""coremerge's distributed merge job on Ray.

``python -m pipeline run job.yaml`` validates the job file (:mod:`pipeline.config`), splits
every merge into shards (:mod:`pipeline.plan`), runs them on long-lived merge actors
(:mod:`pipeline.actors`, :mod:`pipeline.worker`), records each shard in a Parquet manifest
(:mod:`pipeline.manifest`), and has an actor write each merged adapter as ``coremerge merge``
would (:mod:`pipeline.assemble`); running it again resumes. ``python -m pipeline status job.yaml``
reads the manifest. See cluster/README.md for clusters.

Importing this package does not import ray; the driver and the actors do.
"""
