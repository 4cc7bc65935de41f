"""What the shadow's idle CPU class refuses: a slot name that is not a plain name (it becomes a
cgroup directory), and a cgroup path that would lead outside the cgroup tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airmlops.serving import cpu_class
from airmlops.serving.deploy.state import SlotHandle


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", "x" * 102, "-lead", ".."])
def test_a_slot_name_that_is_not_a_plain_name_is_refused(name: str) -> None:
    handle = SlotHandle(target="process", artifact="svc:1", port=40000, instance="test",
                        pid=os.getpid())
    with pytest.raises(ValueError, match="invalid slot name"):
        cpu_class.yield_cpu(handle, name)
    cpu_class.release_group(name)  # refused silently: nothing outside the tree is removed


def test_a_cgroup_path_leading_out_of_the_tree_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text("4:cpu,cpuacct:/../../etc\n")
    monkeypatch.setattr(cpu_class, "PROC", proc)
    assert cpu_class._cgroup_of(4242, root) is None
    (proc / "4242" / "cgroup").write_text("4:cpu,cpuacct:/docker/abc\n")
    assert cpu_class._cgroup_of(4242, root) == (root / "docker" / "abc").resolve()
