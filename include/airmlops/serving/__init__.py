"""Serving: the model service, its bento, its container image and its deployment.

- :mod:`~airmlops.serving.docker_engine`: is a Docker engine reachable, and the few engine calls
  every other module shares (loopback-only networking is enforced here).
- :mod:`~airmlops.serving.container`: a real image from an exported bento, built with no network
  from a wheelhouse prepared on the host.

Nothing is imported here: the Docker SDK and BentoML are imported by the functions that use
them, so that a DAG file can import this package at parse time for nothing.
"""
