"""Serving: the model service, its bento, its container image and its deployment.

- :mod:`~airmlops.serving.docker_engine`: is a Docker engine reachable, and the few engine calls
  every other module shares (loopback-only networking is enforced here).
- :mod:`~airmlops.serving.container`: a real image from an exported bento, built with no network
  from a wheelhouse (:mod:`~airmlops.serving.wheelhouse`) prepared on the host; the bento archive
  (:mod:`~airmlops.serving.bento_archive`), the base image's probe
  (:mod:`~airmlops.serving.base_image`) and the hardened run options
  (:mod:`~airmlops.serving.run_options`) beside it.
- :mod:`~airmlops.serving.bento`: the bento of one model version (spec pinned, digests checked).
- :mod:`~airmlops.serving.service`: the model service BentoML runs, made of its config
  (:mod:`~airmlops.serving.config`), request schemas (:mod:`~airmlops.serving.schemas`), runtime
  (:mod:`~airmlops.serving.runtime`), coalescer and handler (:mod:`~airmlops.serving.predict`),
  metrics (:mod:`~airmlops.serving.metrics`), request gate (:mod:`~airmlops.serving.gate`) and
  process setup (:mod:`~airmlops.serving.process_setup`).
- :mod:`~airmlops.serving.prediction_log`: every answered prediction and label, exactly once
  (SQLite or Redis Streams, a spill file while the backend is down).
- :mod:`~airmlops.serving.proxy`: the stable address (health checks, failover, switches).
- :mod:`~airmlops.serving.deploy`: blue/green slots behind the stable address, supervised.

Nothing is imported here: the Docker SDK and BentoML are imported by the functions that use
them, so that a DAG file can import this package at parse time for nothing.
"""
