"""Health checks of the compose stack's services, cheap enough to run every few seconds.

Airflow's own checks (``airflow jobs check``, ``celery inspect ping`` through Airflow's app)
import all of Airflow, several seconds of CPU per call; on a small machine four of those every
half minute cost a core. These answer the same questions with a few hundred milliseconds:

``http URL``
    Healthy when ``URL`` answers 200 (the API server's ``/api/v2/monitor/health``, MLflow's
    ``/health``). No proxy is used: these are local addresses.
``job TYPE``
    Healthy when the metadata database holds a running Airflow job of ``TYPE`` (SchedulerJob,
    TriggererJob, DagProcessorJob) of this host whose heartbeat is recent: the check
    ``airflow jobs check --job-type TYPE --hostname $HOSTNAME`` makes, as one SQL query.
``celery``
    Healthy when this container's Celery worker (its node name is in
    ``$AIRFLOW_HOME/celery-node``, written by the entrypoint) answers a ping over the broker.

Exit status 0 means healthy, 1 unhealthy; the reason goes to stdout (``docker inspect`` shows it).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

JOB_TYPES = ("SchedulerJob", "TriggererJob", "DagProcessorJob")


def check_http(url: str, timeout: float) -> str:
    """Raise unless ``url`` answers 200; return a short description."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return f"{url} answered 200"


def _connect_args(sqlalchemy_url: str) -> dict[str, object]:
    """psycopg2 connection arguments from Airflow's SQLAlchemy URL."""
    parts = urlsplit(sqlalchemy_url)
    if not parts.scheme.startswith("postgresql"):
        raise ValueError("the job check supports PostgreSQL metadata databases only")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    args: dict[str, object] = {
        "dbname": unquote(parts.path.lstrip("/")) or "airflow",
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "host": query.get("host") or parts.hostname or "localhost",
        "port": parts.port or int(query.get("port", 5432)),
        "connect_timeout": 5,
        "application_name": "airmlops-healthcheck",
    }
    return args


def airflow_fqdn() -> str:
    """The host name Airflow records for its jobs (``airflow.utils.net.getfqdn``, the default
    ``hostname_callable``; not ``socket.getfqdn``, which can answer ``localhost``)."""
    name = socket.gethostname()
    try:
        addresses = socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM, 0, socket.AI_CANONNAME)
    except OSError:
        return name
    return next((address[3] for address in addresses if address[3]), name)


def check_job(job_type: str, max_age: float, hostname: str | None) -> str:
    """Raise unless a running ``job_type`` job of ``hostname`` heartbeated within ``max_age``."""
    import psycopg2

    if job_type not in JOB_TYPES:
        raise ValueError(f"job type must be one of {JOB_TYPES}")
    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not url:
        raise RuntimeError("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is not set")
    hostname = hostname or airflow_fqdn()
    connection = psycopg2.connect(**_connect_args(url))
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT extract(epoch FROM now() - max(latest_heartbeat)) FROM job "
                "WHERE job_type = %s AND state = 'running' AND hostname = %s",
                (job_type, hostname),
            )
            (age,) = cursor.fetchone()
    finally:
        connection.close()
    if age is None:
        raise RuntimeError(f"no running {job_type} of host {hostname}")
    if float(age) > max_age:
        raise RuntimeError(f"{job_type} of {hostname}: last heartbeat {float(age):.0f} s ago")
    return f"{job_type} of {hostname}: heartbeat {float(age):.1f} s ago"


def check_celery(timeout: float) -> str:
    """Raise unless this container's Celery worker answers a ping through the broker."""
    from celery import Celery

    node_file = Path(os.environ.get("AIRFLOW_HOME", "/opt/airflow")) / "celery-node"
    try:
        node = node_file.read_text().strip()
    except FileNotFoundError:
        raise RuntimeError(f"{node_file} is missing: the worker has not started") from None
    broker = os.environ.get("AIRFLOW__CELERY__BROKER_URL", "")
    if not broker:
        raise RuntimeError("AIRFLOW__CELERY__BROKER_URL is not set")
    app = Celery("airmlops-healthcheck", broker=broker)
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    finally:
        app.close()
    if not replies:
        raise RuntimeError(f"Celery worker {node} did not answer a ping")
    return f"Celery worker {node} answered"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    http = sub.add_parser("http", help="a URL answers 200")
    http.add_argument("url")
    http.add_argument("--timeout", type=float, default=5.0)
    job = sub.add_parser("job", help="an Airflow job of this host heartbeats")
    job.add_argument("job_type", choices=JOB_TYPES)
    job.add_argument("--max-age", type=float, default=60.0, help="seconds (default 60)")
    job.add_argument("--hostname", help="default: this host's name as Airflow records it")
    celery = sub.add_parser("celery", help="this container's Celery worker answers a ping")
    celery.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        if args.check == "http":
            message = check_http(args.url, args.timeout)
        elif args.check == "job":
            message = check_job(args.job_type, args.max_age, args.hostname)
        else:
            message = check_celery(args.timeout)
    except Exception as exc:  # any failure is "unhealthy", with its reason
        print(f"unhealthy: {exc}")
        return 1
    print(f"healthy: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
