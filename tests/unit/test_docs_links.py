"""The README and the manual (``docs/*.md``) point only at things that exist.

- every relative Markdown link points to an existing file, and every ``#anchor`` (in the same
  page or another ``.md``) matches a heading of the target (GitHub's slugs);
- every ``make <target>`` named in a code span or block is a target of the Makefile;
- every ``airmlops <command> [<subcommand>]`` named in a code span or block exists (its
  ``--help`` answers, and a subcommand is one its parent lists).

Every refusal names the page, the line and the bad link or command.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
AIRMLOPS = REPO_ROOT / ".venv" / "bin" / "airmlops"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML_LINK = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""", re.IGNORECASE)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
_MAKE = re.compile(r"(?:^|[\s;&|(`$])make\s+((?:[A-Za-z_]\w*=\S*\s+)*)([A-Za-z0-9][\w.-]*)")
_AIRMLOPS = re.compile(r"(?:^|[\s;&|(`$]|/bin/)airmlops((?:\s+[a-z][\w-]*)+)")


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


@functools.cache
def _lines(path: Path) -> tuple[tuple[int, str, bool], ...]:
    """(line number, text, inside a fenced block) for every line of a page."""
    out: list[tuple[int, str, bool]] = []
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        found = _FENCE.match(line)
        if fence is None and found:
            fence = found.group(1)
            out.append((number, line, True))
            continue
        if fence is not None:
            stripped = line.strip()
            if (found and stripped.startswith(fence[0] * len(fence))
                    and not stripped.strip(fence[0])):
                fence = None
            out.append((number, line, True))
            continue
        out.append((number, line, False))
    return tuple(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower-case, punctuation but ``-`` and
    ``_`` removed, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors of a page's headings, with GitHub's ``-1``, ``-2`` for repeated ones."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _number, line, in_code in _lines(path):
        heading = None if in_code else _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return frozenset(result)


def _prose(line: str) -> str:
    """A line with its code spans blanked out (links inside code are not links)."""
    return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link of a page outside code."""
    found: list[tuple[int, str]] = []
    for number, line, in_code in _lines(path):
        if in_code:
            continue
        prose = _prose(line)
        targets = [m.group(1) for m in _INLINE_LINK.finditer(prose)]
        targets += [m.group(1) for m in _HTML_LINK.finditer(prose)]
        definition = _REFERENCE_DEF.match(prose)
        if definition:
            targets.append(definition.group(1))
        found += [(number, target) for target in targets]
    return found


def code_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every code span and every line of a fenced block of a page."""
    found: list[tuple[int, str]] = []
    for number, line, in_code in _lines(path):
        if in_code:
            if not _FENCE.match(line):
                found.append((number, line))
            continue
        found += [(number, m.group(2)) for m in _CODE_SPAN.finditer(line)]
    return found


def link_problem(page: Path, target: str) -> str | None:
    """Why a link of ``page`` is broken, or None."""
    if _EXTERNAL.match(target) or target.startswith("//"):
        return None
    file_part, _, anchor = target.partition("#")
    file_part = unquote(file_part.split("?", 1)[0])
    destination = (page.parent / file_part).resolve() if file_part else page
    if file_part and not destination.exists():
        return f"{file_part} does not exist (resolved to {destination})"
    if not anchor:
        return None
    if destination.suffix.lower() != ".md" or destination.is_dir():
        return f"#{anchor} points into {file_part}, which is not a Markdown page"
    if unquote(anchor).lower() not in anchors(destination):
        return (f"#{anchor} matches no heading of {_rel(destination)} "
                f"(its anchors: {sorted(anchors(destination))})")
    return None


@functools.cache
def make_targets() -> frozenset[str]:
    targets: set[str] = set()
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([A-Za-z0-9][\w.\- ]*?)\s*:(?!=)", line)
        if rule and not line.startswith(("\t", ".")):
            targets.update(rule.group(1).split())
    return frozenset(targets)


@functools.cache
def _help(command: tuple[str, ...]) -> tuple[int, str]:
    done = subprocess.run([str(AIRMLOPS), *command, "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)
    return done.returncode, done.stdout + done.stderr


def _subcommands(command: tuple[str, ...]) -> set[str] | None:
    """The choices of the first positional of ``airmlops <command>``, or None if it has none."""
    code, text = _help(command)
    usage = re.search(r"usage:.*?(?:\n\n|$)", text, re.DOTALL)
    choices = re.search(r"\{([\w,-]+)\}", usage.group(0) if usage else "")
    return set(choices.group(1).split(",")) if code == 0 and choices else None


def airmlops_problem(words: list[str]) -> str | None:
    """Why ``airmlops <words...>`` names a command that does not exist, or None."""
    command: tuple[str, ...] = ()
    for word in words:
        choices = _subcommands(command)
        if choices is None:  # the rest are arguments, not commands
            return None
        if word not in choices:
            where = " ".join(["airmlops", *command])
            return f"'{where} {word}': {where} has no command {word!r} (it has {sorted(choices)})"
        command += (word,)
    code, text = _help(command)
    if code != 0:
        return f"'airmlops {' '.join(command)} --help' exits {code}: {text[-500:]}"
    return None


def test_the_pages_are_found():
    assert PAGES[0].name == "README.md" and len(PAGES) > 3, PAGES


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for page in PAGES:
        for number, target in links(page):
            problem = link_problem(page, target)
            if problem:
                problems.append(f"{_rel(page)}:{number}: link ({target}): {problem}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_named_make_target_exists():
    assert {"run", "test"} <= make_targets(), sorted(make_targets())
    problems = []
    for page in PAGES:
        for number, text in code_texts(page):
            for found in _MAKE.finditer(text):
                target = found.group(2)
                if target not in make_targets():
                    problems.append(f"{_rel(page)}:{number}: `make {target}`: no such target in "
                                    f"the Makefile (it has {sorted(make_targets())})")
    assert not problems, "unknown make targets:\n" + "\n".join(problems)


def test_every_named_airmlops_command_exists():
    assert AIRMLOPS.exists(), f"{AIRMLOPS} is missing: the package is not installed (make setup)"
    problems = []
    checked = 0
    for page in PAGES:
        for number, text in code_texts(page):
            for found in _AIRMLOPS.finditer(text):
                checked += 1
                problem = airmlops_problem(found.group(1).split())
                if problem:
                    problems.append(f"{_rel(page)}:{number}: {problem}")
    assert checked, "no `airmlops <command>` found in the docs: the pattern is broken"
    assert not problems, "unknown airmlops commands:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# The checker itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Quick start", "quick-start"),
    ("Serving: containerize, deploy, monitor", "serving-containerize-deploy-monitor"),
    ("Settings (`.env` or the API server's environment)",
     "settings-env-or-the-api-servers-environment"),
    ("The simulator's world", "the-simulators-world"),
    ("Replay your own data; synthetic traffic", "replay-your-own-data-synthetic-traffic"),
    ("The feature_store section of a spec", "the-feature_store-section-of-a-spec"),
    ("Troubleshooting `make run`", "troubleshooting-make-run"),
])
def test_slug_follows_github(heading: str, anchor: str):
    assert slug(heading) == anchor


def test_the_checker_refuses_what_is_broken(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part two\n\n```\n# not a heading\n```\n")
    other = tmp_path / "other.md"
    other.write_text("# Other\n")
    assert link_problem(page, "#part-two") is None
    assert link_problem(page, "other.md#other") is None
    assert link_problem(page, "https://example.com/#x") is None
    assert "does not exist" in (link_problem(page, "missing.md") or "")
    assert "matches no heading" in (link_problem(page, "#not-a-heading") or "")
    assert "matches no heading" in (link_problem(page, "other.md#title") or "")
