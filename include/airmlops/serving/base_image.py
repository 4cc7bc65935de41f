"""What a base image runs: its Python, its glibc and its machine, probed once per image id.

The wheels of a model image must match these (:attr:`BaseImageInfo.platform_tags`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING

from airmlops.serving.build_common import ContainerBuildError
from airmlops.serving.docker_engine import check_network_mode, validate_image_ref

if TYPE_CHECKING:
    from docker import DockerClient


@dataclasses.dataclass(frozen=True)
class BaseImageInfo:
    """What the wheels must match in a base image: Python version, glibc version, machine."""

    python_version: str
    glibc_version: str
    machine: str

    @property
    def python_minor(self) -> str:
        """The Python minor version (``3.11``)."""
        return ".".join(self.python_version.split(".")[:2])

    @property
    def platform_tags(self) -> tuple[str, ...]:
        """Every manylinux platform tag this glibc runs, newest first.

        pip does not expand ``manylinux_2_Y`` to older tags by itself (only the legacy
        ``manylinux2014``/``2010`` aliases), so the whole list is passed to ``pip download``.
        """
        major, minor = (int(part) for part in self.glibc_version.split(".")[:2])
        if major != 2:
            raise ContainerBuildError(f"unsupported glibc {self.glibc_version}")
        tags = [f"manylinux_2_{y}_{self.machine}" for y in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.machine}" for y, name in legacy.items() if y <= minor]
        return tuple(tags)


def probe_base_image(client: DockerClient, base_image: str) -> BaseImageInfo:
    """Python version, glibc version and machine of ``base_image``.

    Runs ``python3`` in it once per image id (network none, container removed); later calls
    for the same image id are answered from memory.
    """
    import docker.errors

    image_id = client.images.get(validate_image_ref(base_image)).id
    if image_id in _BASE_IMAGE_PROBES:
        return _BASE_IMAGE_PROBES[image_id]
    try:
        output = client.containers.run(
            image_id,
            ["python3", "-c", _PROBE],
            network_mode=check_network_mode("none"),
            remove=True,
            stdout=True,
            stderr=True,
        )
    except docker.errors.ContainerError as exc:
        raise ContainerBuildError(f"base image {base_image} runs no python3: {exc}") from None
    data = json.loads(output.decode().strip().splitlines()[-1])
    if data.get("libc") != "glibc" or not re.fullmatch(r"[0-9]+\.[0-9]+", data["libc_version"]):
        raise ContainerBuildError(
            f"base image {base_image} has libc {data.get('libc')!r}: manylinux wheels need glibc"
        )
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(data["machine"], data["machine"])
    info = BaseImageInfo(
        python_version=data["python"], glibc_version=data["libc_version"], machine=machine
    )
    _BASE_IMAGE_PROBES[image_id] = info
    return info


_BASE_IMAGE_PROBES: dict[str, BaseImageInfo] = {}
_PROBE = (
    "import json, platform; libc, version = platform.libc_ver(); "
    "print(json.dumps({'python': platform.python_version(), 'libc': libc, "
    "'libc_version': version, 'machine': platform.machine()}))"
)
