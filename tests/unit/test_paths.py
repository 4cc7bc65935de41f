"""The shared safe path join and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from airmlops.paths import atomic_write_bytes, atomic_write_json, atomic_write_text, safe_join


def test_safe_join_confines_parts_under_the_root(tmp_path: Path) -> None:
    joined = safe_join(tmp_path, "snapshots", "churn/intervals", "a.json")
    assert joined == tmp_path.resolve() / "snapshots" / "churn" / "intervals" / "a.json"


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("..", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a\x00b", "NUL"),
        ("", "empty"),
    ],
)
def test_safe_join_rejects_unsafe_parts_and_names_them(tmp_path: Path, part: str,
                                                       reason: str) -> None:
    with pytest.raises(ValueError) as error:
        safe_join(tmp_path, "ok", part)
    assert reason in str(error.value)
    assert repr(part) in str(error.value)


def test_safe_join_rejects_a_symlink_that_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="escapes the root"):
        safe_join(root, "link", "file.txt")
    (root / "inner").mkdir()
    (root / "ok").symlink_to(root / "inner")
    assert safe_join(root, "ok", "f") == (root / "inner" / "f").resolve()


def test_atomic_writes_create_parents_replace_content_and_leave_no_temp_files(
    tmp_path: Path,
) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)

    text = tmp_path / "t.txt"
    atomic_write_text(text, "héllo")
    assert text.read_text(encoding="utf-8") == "héllo"

    data = tmp_path / "d.json"
    atomic_write_json(data, {"b": 1, "a": [1, 2]})
    assert json.loads(data.read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["file.bin"]
    assert sorted(os.listdir(tmp_path)) == ["a", "d.json", "t.txt"]


def test_a_failed_atomic_write_keeps_the_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "d.json"
    atomic_write_json(target, {"version": 1})

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["d.json"]
