# A Python 3.11 base for the airmlops image (docker/Dockerfile) where no registry is reachable.
#
# The airmlops image needs CPython >= 3.11.4 (the containerize stage extracts bentos with the
# tarfile extraction filters of PEP 706, new in 3.11.4). Users get that from the official
# python:3.11-slim-bookworm. Without a registry the only local Debian image is the debootstrap
# one (scripts/ensure-base-image.sh), whose Debian Python is 3.11.2; so this image adds the
# host's own CPython 3.11 interpreter and standard library (no site-packages) to it, at the same
# prefix (its shared library is found through an rpath to that prefix). Debian's libraries in
# the base image (libssl3, libffi8, libsqlite3...) are those the host's build links against.
#
# Built by scripts/ensure-compose.sh as airmlops/python:3.11-host, from a context holding this
# file and cpython.tar (the interpreter files, paths relative to /):
#   docker build --network none -f python.Dockerfile --build-arg PYTHON_PREFIX=/root/.pyenv/versions/3.11.7 \
#     --build-arg BASE_IMAGE=airmlops/python:3.11-bookworm -t airmlops/python:3.11-host CONTEXT
ARG BASE_IMAGE=airmlops/python:3.11-bookworm
FROM ${BASE_IMAGE}
ARG PYTHON_PREFIX

ADD cpython.tar /
# Every folder above the prefix must be traversable by the non-root users of derived images
# (group and others: the airmlops image's user has group 0, like root's folder).
# `python3` is found through PATH in the prefix's own bin folder (not a symlink elsewhere: a
# virtual environment records the folder of the interpreter it was made with, and Python finds
# its standard library from there).
RUN set -eu; \
    test -x "${PYTHON_PREFIX}/bin/python3.11"; \
    dir="${PYTHON_PREFIX}"; \
    while [ "$dir" != / ]; do chmod go+rx "$dir"; dir=$(dirname "$dir"); done; \
    ln -sf python3.11 "${PYTHON_PREFIX}/bin/python3"; \
    ln -sf python3.11 "${PYTHON_PREFIX}/bin/python"

ENV PATH=${PYTHON_PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8

RUN set -eu; \
    python3 -c 'import bz2, ctypes, lzma, readline, sqlite3, ssl, tarfile, uuid, zlib; \
tarfile.data_filter; import sys; print(sys.version)'; \
    python3 -m venv /tmp/venv-check; /tmp/venv-check/bin/python -m pip --version; \
    rm -rf /tmp/venv-check
CMD ["python3"]
