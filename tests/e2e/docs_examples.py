"""The fenced code blocks of the README and the manual (``docs/*.md``), for the docs test.

:func:`doc_files` discovers the pages (a new page under ``docs/`` is covered without a change
here); :func:`code_blocks` reads a page's fenced blocks, each with its language, its text, the
line of its opening fence (its id is ``file:line``) and the markers of the HTML comments right
above it::

    <!-- fragment: monitoring -->     the YAML is part of a spec, checked merged into the demo's
    <!-- spec -->                     the YAML is a whole spec (also when it lacks name/source)
    <!-- file: include/pipelines/x.yaml -->   the block's text is this file of the reader's
                                      checkout (or data root): examples below it may use it

:func:`shell_script` and :func:`command_heads` look into shell blocks: the script a block runs
(for ``console`` blocks, the ``$ `` lines) and the first word(s) of every command in it, to
decide whether a block can run in a test.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

SHELL_LANGUAGES = frozenset({"bash", "sh", "console"})
"""Shell blocks the docs test runs (``console``: only the ``$ `` lines are commands)."""

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<key>[a-z][a-z-]*)\s*(?::\s*(?P<value>.*?))?\s*-->\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>[A-Za-z_][A-Za-z0-9_]*)\1")
_OPERATORS = frozenset({";", "&&", "||", "|", "&", "(", ")", "`", "|&", ";;"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class CodeBlock:
    """One fenced block of a Markdown page."""

    page: str
    """The page, relative to the repository root (``README.md``, ``docs/own-data.md``)."""
    line: int
    """1-based line of the opening fence."""
    language: str
    """The info string's first word, lower-case ("" when there is none)."""
    text: str
    markers: dict[str, str]
    """Markers of the HTML comments right above the fence (``key`` -> ``value``, "" if none)."""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def doc_files(root: Path) -> list[Path]:
    """README.md and every page of ``docs/`` (sorted), as they are now."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def code_blocks(path: Path, root: Path) -> list[CodeBlock]:
    """The fenced code blocks of one Markdown page, in order.

    An unclosed fence is an error (it would swallow the rest of the page).
    """
    page = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[CodeBlock] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = _FENCE.match(lines[index])
            if (closing is not None and closing["fence"][0] == fence[0]
                    and len(closing["fence"]) >= len(fence) and not closing["info"].strip()):
                break
            line = lines[index]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            index += 1
        else:
            raise ValueError(f"{page}:{start + 1}: the code fence {fence} is never closed")
        info = opening["info"].strip().split()
        blocks.append(CodeBlock(page, start + 1, info[0].lower() if info else "",
                                "\n".join(body) + "\n", _markers_above(lines, start)))
        index += 1
    return blocks


def _markers_above(lines: list[str], fence_index: int) -> dict[str, str]:
    """The ``<!-- key: value -->`` comments directly above a fence (no other line between)."""
    markers: dict[str, str] = {}
    index = fence_index - 1
    while index >= 0:
        found = _MARKER.match(lines[index])
        if found is None:
            break
        markers.setdefault(found["key"], (found["value"] or "").strip())
        index -= 1
    return markers


def shell_script(block: CodeBlock) -> str:
    """The script a shell block runs: the text itself, or a console block's ``$ `` lines
    (with their continuation lines)."""
    if block.language != "console":
        return block.text
    script: list[str] = []
    continuing = False
    for line in block.text.splitlines():
        if line.startswith("$ "):
            script.append(line[2:])
        elif continuing:
            script.append(line)
        else:
            continue
        continuing = line.rstrip().endswith("\\")
    return "\n".join(script) + "\n"


def logical_lines(script: str) -> list[str]:
    """A script's commands, one per logical line: continuation lines joined, heredoc bodies
    and comment-only lines left out."""
    result: list[str] = []
    pending = ""
    heredoc: str | None = None
    for raw in script.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if not line or line.startswith("#"):
            continue
        result.append(line)
        found = _HEREDOC.search(line)
        if found is not None:
            heredoc = found["word"]
    if pending.strip():
        result.append(pending.strip())
    return result


def command_heads(script: str) -> list[str]:
    """The command of every simple command of a script (substitutions included), with its
    arguments: ``TOKEN=$(curl -s ...)`` gives ``curl -s ...``; plain assignments give nothing.
    """
    heads: list[str] = []
    for line in logical_lines(script):
        lexer = shlex.shlex(line.replace("$(", " ( "), posix=True, punctuation_chars=";&|()`")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: judge the line by its first word
            tokens = line.split()
        words: list[str] = []
        for token in [*tokens, ";"]:
            if token in _OPERATORS:
                command = _drop_assignments(words)
                if command:
                    heads.append(" ".join(command))
                words = []
            else:
                words.append(token)
    return heads


def _drop_assignments(words: list[str]) -> list[str]:
    index = 0
    while index < len(words) and _ASSIGNMENT.match(words[index]):
        index += 1
    return words[index:]
