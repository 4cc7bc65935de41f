# Redis for the compose stack where no registry is reachable (nothing can be pulled): Debian
# bookworm's redis-server (7.0) on a locally available Debian image, with an entrypoint that
# behaves like the official image's: data in /data, runs as the `redis` user, `redis-server
# [options]` as the command (arguments starting with '-' imply redis-server), protected mode off
# unless the command sets it (the container network is the boundary, as in the official image).
#
# Users with a registry use the official image (REDIS_IMAGE=redis:7.2) instead.
# Built by scripts/ensure-compose.sh as airmlops/redis:local:
#   docker build --network host -f docker/local/redis.Dockerfile \
#     --build-arg BASE_IMAGE=airmlops/python:3.11-bookworm -t airmlops/redis:local docker/local
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; \
    apt-get update; \
    apt-get install -y --no-install-recommends redis-server util-linux; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/sbin/policy-rc.d; \
    mkdir -p /data; chown redis:redis /data

COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh

VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
