"""A spec file as untrusted input: its bytes, its YAML, and what is wrong with it.

:func:`read_spec_bytes` and :func:`load_spec_yaml` turn a file into a plain mapping (at most
:data:`MAX_SPEC_BYTES`, UTF-8, YAML without anchors, aliases or non-standard tags, at most
:data:`MAX_NESTING` levels deep); :func:`validation_problems` turns pydantic's errors into the
``(field, message)`` lines of a :class:`SpecError`. The schema itself, and the functions that
load and validate a spec, are in :mod:`airmlops.spec`, which re-exports the public names here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from airmlops.errors import NonRetryable

MAX_SPEC_BYTES = 256 * 1024
"""A spec is a page of YAML; a bigger file is refused before it is parsed."""
MAX_NESTING = 32
"""Deepest nesting of mappings and lists a spec may use (the schema needs fewer than 10)."""


class SpecError(NonRetryable, ValueError):
    """A pipeline spec is invalid. The message names the file, the field and what was expected.
    Fixing the file is the only cure, so a task that meets it fails without retries."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]) -> None:
        self.path = str(path)
        self.problems = problems
        lines = [f"{field}: {message}" for field, message in problems]
        super().__init__(f"invalid pipeline spec {self.path}:\n  " + "\n  ".join(lines))


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases (no expansion bombs; a spec never needs
    them) and with a nesting limit."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(None, None, "anchors and aliases (&name, *name) are not "
                                       "allowed in a spec", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.MarkedYAMLError(None, None, f"nested deeper than {MAX_NESTING} "
                                           "levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.2's booleans only: ``yes``/``no``/``on``/``off`` stay text, so a category
# ``values: [yes, no]`` means the strings a CSV holds, not true/false.
_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_spec_bytes(path: Path | str) -> bytes:
    """A spec file's bytes, at most :data:`MAX_SPEC_BYTES` (:class:`SpecError` otherwise)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise SpecError(path, [("(file)", f"cannot be read: {error.strerror}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(path, [("(file)", f"is larger than {MAX_SPEC_BYTES // 1024} KiB")])
    return raw


def _decode_spec(raw: bytes, path: Path) -> str:
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(path, [("(file)", f"is larger than {MAX_SPEC_BYTES // 1024} KiB")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(path, [("(file)", f"is not UTF-8 text (byte 0x{raw[error.start]:02x} "
                                          f"at offset {error.start})")]) from None


_CSafeLoader = getattr(yaml, "CSafeLoader", None)
_FastSpecLoader = None if _CSafeLoader is None else type(
    "_FastSpecLoader", (_CSafeLoader,),
    {"yaml_implicit_resolvers": _SpecLoader.yaml_implicit_resolvers})
"""libyaml's parser with :class:`_SpecLoader`'s resolvers and PyYAML's safe constructor: the
same document about 7x faster (it runs once per spec at every DAG-file parse)."""


_PYYAML_STRICTER = ("\t", "?", "\ufeff")
"""Characters where PyYAML refuses documents libyaml takes (a tab after a colon, ``?`` inside
a flow mapping's plain scalar, a byte-order mark inside the text): such a text is read by
:class:`_SpecLoader` only."""


def _fast_load(text: str) -> tuple[bool, Any]:
    """``(True, document)`` when libyaml reads ``text`` as a plain spec: none of
    :data:`_PYYAML_STRICTER`, no anchor, no alias, no node deeper than :data:`MAX_NESTING`
    (checked on its events before anything is built) and no error; ``(False, None)``
    otherwise, and then :class:`_SpecLoader` reads it again, so that every refusal and its
    message are PyYAML's own."""
    if _FastSpecLoader is None or any(c in text for c in _PYYAML_STRICTER):
        return False, None
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_CSafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                return False, None
            if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)) and (
                    depth + 1 > MAX_NESTING):
                return False, None
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return True, yaml.load(text, Loader=_FastSpecLoader)  # noqa: S506 - safe constructor
    except Exception:  # PyYAML's loader below names the problem
        return False, None


def load_spec_yaml(raw: bytes, path: Path) -> Any:
    """The YAML document in a spec file's bytes (not yet validated); :class:`SpecError` naming
    ``path`` when it is too big, not UTF-8 or not plain YAML."""
    try:
        text = _decode_spec(raw, path)
        done, document = _fast_load(text)
        if done:
            return document
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError:
        raise
    except yaml.YAMLError as error:
        raise SpecError(path, [("(file)", f"is not valid YAML: {error}")]) from None
    except Exception as error:  # e.g. RecursionError, or a too long integer literal
        raise SpecError(path, [("(file)", f"cannot be parsed: {type(error).__name__}")]) from None


def spec_paths(pipelines_dir: Path) -> list[Path]:
    """The spec files of a folder, in a stable order."""
    return sorted([*pipelines_dir.glob("*.yaml"), *pipelines_dir.glob("*.yml")])


def _field_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a dotted path (``features[2].min``)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("simulator", "file", "sql") and parts and parts[-1] == "source":
            continue  # the discriminator tag adds nothing for a reader
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def validation_problems(error: ValidationError,
                        top_fields: Collection[str]) -> list[tuple[str, str]]:
    """``(field, message)`` for each error pydantic found, in a reader's words: the field as a
    dotted path, a check across fields named by the field it names first (when that is one of
    the model's ``top_fields``), the offending value when the message does not show it."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required"
        elif item["type"] == "extra_forbidden":
            message = "is not a known field"
        elif "input" in item and item["type"] != "model_type" and not isinstance(
            item["input"], dict
        ) and repr(item["input"]) not in message:
            message = f"{message} (got {item['input']!r})"
        field = _field_path(item["loc"])
        # Checks across fields name their field at the start of the message.
        named = re.match(r"^([a-z_]+(?:[.\[][\w.\[\]]*)?): (.*)$", message, re.DOTALL)
        if named and named.group(1).split(".")[0].split("[")[0] in top_fields:
            prefix = "" if field == "(top level)" else f"{field}."
            field, message = prefix + named.group(1), named.group(2)
        problems.append((field, message))
    return problems
