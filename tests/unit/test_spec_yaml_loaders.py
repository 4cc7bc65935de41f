"""The fast (libyaml) and the reference (PyYAML) readers of spec YAML agree: the same document
for every plain spec, and the fast one steps aside (PyYAML then refuses with its own message)
for whatever PyYAML treats differently or refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from airmlops.spec_parsing import _fast_load, _SpecLoader

REPO = Path(__file__).resolve().parents[2]
SPEC_FILES = sorted((REPO / "include" / "pipelines").glob("*.yaml")) + sorted(
    (REPO / "tests").rglob("*.yaml"))


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_of_the_repository_reads_the_same(path: Path) -> None:
    text = path.read_text()
    done, document = _fast_load(text)
    assert done, f"{path} should take the fast path"
    assert document == yaml.load(text, Loader=_SpecLoader)


@pytest.mark.parametrize("text", [
    "values: [yes, no, on, off, true, False]\n",
    "a: 1\nb: 2.5\nc: 1e3\nd: null\ne: ~\nf: '007'\ng: 0o17\nh: 2026-01-01\n",
])
def test_scalars_resolve_alike(text: str) -> None:
    done, document = _fast_load(text)
    assert done and document == yaml.load(text, Loader=_SpecLoader)


@pytest.mark.parametrize("text", [
    "a: &x 1\nb: *x\n",                      # anchors and aliases: refused by PyYAML
    "a:\tb\n",                               # a tab PyYAML reads differently
    "a: {b?: 1}\n",                          # '?' inside a flow mapping
    "\ufeffa: 1\n",                          # a byte-order mark
    "a: !!python/object:os.system x\n",      # an unsafe tag: the safe constructor refuses
    "a: [" * 40 + "]" * 40 + "\n",           # nested deeper than the limit
    "a: [1, 2\n",                            # not YAML at all
])
def test_the_fast_reader_steps_aside_for_what_pyyaml_must_judge(text: str) -> None:
    assert _fast_load(text) == (False, None)
