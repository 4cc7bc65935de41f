"""A model service loads only the spec its bento was built with: a ``spec.yaml`` edited after
the build is refused by its hash, and a spec file named outside the bento is refused by its
path (:func:`airmlops.serving.service.load_bento_spec`)."""

from __future__ import annotations

import pytest
from toy_specs import demo_bento

from airmlops.serving.service import load_bento_spec


def test_a_spec_edited_after_the_build_is_refused(tmp_path):
    root, config = demo_bento(tmp_path, tmp_path / "datasets")
    spec_file = root / "spec.yaml"
    spec_file.write_text(spec_file.read_text() + "owner: someone\n")
    with pytest.raises(ValueError, match="is not the spec this bento was built with"):
        load_bento_spec(root, config)


def test_a_spec_file_outside_the_bento_is_refused(tmp_path):
    root, config = demo_bento(tmp_path, tmp_path / "datasets")
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        load_bento_spec(root, config.model_copy(update={"spec_file": "../../etc/passwd"}))
