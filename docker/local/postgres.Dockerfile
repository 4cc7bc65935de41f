# PostgreSQL for the compose stack where no registry is reachable (nothing can be pulled):
# Debian bookworm's PostgreSQL 15 on a locally available Debian image, with an entrypoint that
# behaves like the official image's for what docker-compose.yaml uses: POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB, /docker-entrypoint-initdb.d/*.sh|*.sql on first start,
# PGDATA=/var/lib/postgresql/data, `postgres -c key=value ...` as the command.
#
# Users with a registry use the official image (POSTGRES_IMAGE=postgres:16) instead.
# Built by scripts/ensure-compose.sh as airmlops/postgres:local:
#   docker build --network host -f docker/local/postgres.Dockerfile \
#     --build-arg BASE_IMAGE=airmlops/python:3.11-bookworm -t airmlops/postgres:local docker/local
# (--network host: apt fetches packages from the Debian mirror in the base image's sources.)
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG PG_MAJOR=15
ENV PG_MAJOR=${PG_MAJOR} \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
ENV PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Package scripts must not start services (exit 101), and Debian must not create its own
# cluster: the entrypoint initialises PGDATA itself, as the official image does.
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-common; \
    sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}" util-linux; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/sbin/policy-rc.d; \
    mkdir -p /docker-entrypoint-initdb.d /var/run/postgresql "$PGDATA"; \
    chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql; \
    chmod 2777 /var/run/postgresql; chmod 0700 "$PGDATA"

COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh

VOLUME /var/lib/postgresql/data
EXPOSE 5432
# SIGINT is PostgreSQL's "fast" shutdown (SIGTERM waits for every client to leave).
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
