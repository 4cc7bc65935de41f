"""Pure webhook checks: who sent a delivery, and what it says.

Authentication comes first and works on the raw bytes: GitHub signs the body with HMAC-SHA256
(``X-Hub-Signature-256: sha256=<hex>``), GitLab sends a shared token (``X-Gitlab-Token``); both
are compared in constant time. Only then is the body parsed, into a small :class:`PushEvent`
(a push to a branch, or a merged pull/merge request) or an :class:`IgnoredEvent` that says why
nothing should happen. Every field that leaves this module is validated against a strict
pattern, so no payload string can smuggle anything into a run id, a log line or a lineage tag.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

GITHUB_SIGNATURE_PREFIX = "sha256="
DELIVERY_ID_PATTERN = re.compile(r"^[A-Za-z0-9-]{1,100}$")
COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
"""A full SHA-1 (40 hex) or SHA-256 (64 hex) object name, lower case as both providers send it."""
REPOSITORY_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,100}(?:/[A-Za-z0-9_.-]{1,100}){1,20}$")
"""``owner/name`` on GitHub, ``group/subgroup/.../name`` on GitLab."""
BRANCH_PATTERN = re.compile(r"^[^\x00-\x20\x7f~^:?*\[\\]{1,244}$")
"""What git accepts in a branch name (``git check-ref-format``), minus the rarer corner cases;
short enough that ``refs/heads/<branch>`` fits the training DAG's 255-character ``git_ref``."""
MAX_REPOSITORY_LENGTH = 255
MAX_REASON_LENGTH = 500
"""The training DAG's params cap ``git_repository`` and ``trigger_reason`` at these lengths."""
EVENT_NAME_PATTERN = re.compile(r"^[A-Za-z _]{1,50}$")
GITHUB_MAX_PUSH_COMMITS = 2048
"""GitHub lists at most this many commits in a push; beyond that the changed files are unknown."""
PIPELINE_PATH_PREFIXES = ("dags/", "plugins/", "include/")
REQUIREMENTS_PATTERN = "requirements*.txt"
_ZERO_COMMIT = re.compile(r"^0+$")


class PayloadError(ValueError):
    """The body is not a well-formed event of the kind its headers announce (answered 400)."""


@dataclass(frozen=True)
class PushEvent:
    """New code on a branch: a push, or a merged pull request (GitHub) / merge request (GitLab).

    ``changed_paths`` is ``None`` when the provider does not say which files changed (merge
    events, or a push with more commits than the payload lists); callers treat that as
    "possibly everything".
    """

    provider: Literal["github", "gitlab"]
    delivery_id: str
    kind: Literal["push", "merge"]
    repository: str
    ref: str
    branch: str
    commit: str
    changed_paths: tuple[str, ...] | None

    @property
    def short_commit(self) -> str:
        return self.commit[:12]

    def describe(self) -> str:
        """One line for a run's ``trigger_reason``, built only from validated fields."""
        action = "git push to" if self.kind == "push" else "merge into"
        reason = f"{action} {self.branch} of {self.repository} at {self.short_commit}"
        return reason[:MAX_REASON_LENGTH]


@dataclass(frozen=True)
class IgnoredEvent:
    """A genuine delivery that asks for no training run, and why (answered 2xx "ignored")."""

    reason: str


def github_signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body`` signed with ``secret``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return GITHUB_SIGNATURE_PREFIX + digest


def verify_github_signature(secret: str, body: bytes, signature_header: str | None) -> bool:
    """Whether ``signature_header`` is the HMAC-SHA256 of the raw ``body`` under ``secret``.

    Refuses an empty secret (fail closed), a missing header and the legacy ``sha1=`` form; the
    comparison is constant-time so a caller cannot learn the digest byte by byte.
    """
    if not secret or not signature_header:
        return False
    if not signature_header.startswith(GITHUB_SIGNATURE_PREFIX):
        return False
    expected = github_signature(secret, body).encode("ascii")
    return hmac.compare_digest(expected, signature_header.encode("utf-8"))


def verify_gitlab_token(expected: str, token_header: str | None) -> bool:
    """Whether GitLab's ``X-Gitlab-Token`` equals the configured token (constant-time)."""
    if not expected or not token_header:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), token_header.encode("utf-8"))


def is_valid_delivery_id(value: str | None) -> bool:
    """Whether a delivery id is safe to embed in a run id (letters, digits, dashes; <= 100)."""
    return value is not None and DELIVERY_ID_PATTERN.fullmatch(value) is not None


def load_json_object(body: bytes) -> dict[str, Any]:
    """Decode an authenticated body as a JSON object; raise :class:`PayloadError` otherwise."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise PayloadError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise PayloadError("body is not a JSON object")
    return payload


def parse_github_event(event: str, delivery_id: str, payload: Mapping[str, Any]) -> (
    PushEvent | IgnoredEvent
):
    """Turn a GitHub delivery (``X-GitHub-Event`` and the parsed body) into what it asks for."""
    if event == "push":
        return _github_push(delivery_id, payload)
    if event == "pull_request":
        return _github_pull_request(delivery_id, payload)
    if event == "ping":
        return IgnoredEvent("ping: the webhook is set up; push events trigger training")
    return IgnoredEvent(f"event {_quoted(event)} is not handled (only push and pull_request)")


def parse_gitlab_event(event: str, delivery_id: str, payload: Mapping[str, Any]) -> (
    PushEvent | IgnoredEvent
):
    """Turn a GitLab delivery (``X-Gitlab-Event`` and the parsed body) into what it asks for."""
    if event == "Push Hook":
        return _gitlab_push(delivery_id, payload)
    if event == "Merge Request Hook":
        return _gitlab_merge_request(delivery_id, payload)
    return IgnoredEvent(
        f"event {_quoted(event)} is not handled (only Push Hook and Merge Request Hook)"
    )


def pipeline_files_changed(changed_paths: Iterable[str], spec_file: str | None = None) -> bool:
    """Whether any changed path can alter what a pipeline trains.

    That is anything under ``dags/``, ``plugins/`` or ``include/``, a top-level
    ``requirements*.txt``, or the pipeline's own spec file (``spec_file``, relative to the
    repository root, for specs kept outside ``include/``).
    """
    for path in changed_paths:
        if path.startswith(PIPELINE_PATH_PREFIXES):
            return True
        if "/" not in path and fnmatch.fnmatchcase(path, REQUIREMENTS_PATTERN):
            return True
        if spec_file is not None and path == spec_file:
            return True
    return False


def _github_push(delivery_id: str, payload: Mapping[str, Any]) -> PushEvent | IgnoredEvent:
    ref = _string(payload, "ref")
    if not ref.startswith("refs/heads/"):
        return IgnoredEvent("not a branch push (tags and other refs do not trigger training)")
    if payload.get("deleted") is True:
        return IgnoredEvent("branch deleted")
    commit = _string(payload, "after")
    if _ZERO_COMMIT.fullmatch(commit):
        return IgnoredEvent("branch deleted")
    commits = payload.get("commits")
    changed = _changed_paths(commits, "commits")
    if isinstance(commits, list) and len(commits) >= GITHUB_MAX_PUSH_COMMITS:
        changed = None
    return PushEvent(
        provider="github",
        delivery_id=delivery_id,
        kind="push",
        repository=_repository(_mapping(payload, "repository"), "full_name", "repository"),
        ref=ref,
        branch=_branch(ref.removeprefix("refs/heads/"), "ref"),
        commit=_commit(commit, "after"),
        changed_paths=changed,
    )


def _github_pull_request(delivery_id: str, payload: Mapping[str, Any]) -> (
    PushEvent | IgnoredEvent
):
    action = _string(payload, "action")
    pull_request = _mapping(payload, "pull_request")
    if action != "closed":
        return IgnoredEvent(f"pull request {_quoted(action)}: only merged pull requests act")
    if pull_request.get("merged") is not True:
        return IgnoredEvent("pull request closed without merging")
    branch = _branch(_string(_mapping(pull_request, "base"), "ref", "pull_request.base"),
                     "pull_request.base.ref")
    return PushEvent(
        provider="github",
        delivery_id=delivery_id,
        kind="merge",
        repository=_repository(_mapping(payload, "repository"), "full_name", "repository"),
        ref=f"refs/heads/{branch}",
        branch=branch,
        commit=_commit(_string(pull_request, "merge_commit_sha", "pull_request"),
                       "pull_request.merge_commit_sha"),
        changed_paths=None,
    )


def _gitlab_push(delivery_id: str, payload: Mapping[str, Any]) -> PushEvent | IgnoredEvent:
    if payload.get("object_kind") != "push":
        raise PayloadError("object_kind: expected 'push' for a Push Hook")
    ref = _string(payload, "ref")
    if not ref.startswith("refs/heads/"):
        return IgnoredEvent("not a branch push (tags and other refs do not trigger training)")
    after = _string(payload, "after")
    if _ZERO_COMMIT.fullmatch(after):
        return IgnoredEvent("branch deleted")
    checkout_sha = payload.get("checkout_sha")
    commit = checkout_sha if isinstance(checkout_sha, str) and checkout_sha else after
    commits = payload.get("commits")
    changed = _changed_paths(commits, "commits")
    total = payload.get("total_commits_count")
    if isinstance(total, int) and isinstance(commits, list) and total > len(commits):
        changed = None  # GitLab lists at most 20 commits: the rest of the files are unknown
    return PushEvent(
        provider="gitlab",
        delivery_id=delivery_id,
        kind="push",
        repository=_repository(_mapping(payload, "project"), "path_with_namespace", "project"),
        ref=ref,
        branch=_branch(ref.removeprefix("refs/heads/"), "ref"),
        commit=_commit(commit, "checkout_sha"),
        changed_paths=changed,
    )


def _gitlab_merge_request(delivery_id: str, payload: Mapping[str, Any]) -> (
    PushEvent | IgnoredEvent
):
    if payload.get("object_kind") != "merge_request":
        raise PayloadError("object_kind: expected 'merge_request' for a Merge Request Hook")
    attributes = _mapping(payload, "object_attributes")
    action = attributes.get("action")
    if action != "merge":
        shown = _quoted(action) if isinstance(action, str) else "without action"
        return IgnoredEvent(f"merge request {shown}: only merged merge requests act")
    branch = _branch(_string(attributes, "target_branch", "object_attributes"),
                     "object_attributes.target_branch")
    # A merge commit, else the squash commit, else (fast-forward) the source's last commit.
    commit = None
    for key in ("merge_commit_sha", "squash_commit_sha"):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            commit = value
            break
    if commit is None:
        last_commit = attributes.get("last_commit")
        if isinstance(last_commit, Mapping):
            commit = last_commit.get("id")
    if not isinstance(commit, str):
        raise PayloadError("object_attributes: no merge_commit_sha, squash_commit_sha or "
                           "last_commit.id")
    return PushEvent(
        provider="gitlab",
        delivery_id=delivery_id,
        kind="merge",
        repository=_repository(_mapping(payload, "project"), "path_with_namespace", "project"),
        ref=f"refs/heads/{branch}",
        branch=branch,
        commit=_commit(commit, "object_attributes.merge_commit_sha"),
        changed_paths=None,
    )


def _changed_paths(commits: Any, field: str) -> tuple[str, ...] | None:
    """The union of files added, modified or removed by ``commits``; ``None`` if not listed."""
    if not isinstance(commits, list) or not commits:
        return None  # e.g. a new branch pointing at an existing commit, or a forced rewind
    seen: dict[str, None] = {}
    for index, commit in enumerate(commits):
        if not isinstance(commit, Mapping):
            raise PayloadError(f"{field}[{index}]: expected an object")
        for kind in ("added", "modified", "removed"):
            paths = commit.get(kind, [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise PayloadError(f"{field}[{index}].{kind}: expected a list of paths")
            seen.update(dict.fromkeys(paths))
    return tuple(seen)


def _mapping(payload: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = payload.get(key)
    if not isinstance(value, Mapping):
        raise PayloadError(f"{key}: expected an object")
    return value


def _string(payload: Mapping[str, Any], key: str, where: str = "") -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{where + '.' if where else ''}{key}: expected a non-empty string")
    return value


def _repository(payload: Mapping[str, Any], key: str, where: str) -> str:
    value = _string(payload, key, where)
    if len(value) > MAX_REPOSITORY_LENGTH or not REPOSITORY_PATTERN.fullmatch(value):
        raise PayloadError(f"{where}.{key}: not a repository name")
    return value


def _branch(value: str, field: str) -> str:
    if not BRANCH_PATTERN.fullmatch(value) or ".." in value:
        raise PayloadError(f"{field}: not a valid branch name")
    return value


def _commit(value: str, field: str) -> str:
    if not COMMIT_PATTERN.fullmatch(value):
        raise PayloadError(f"{field}: expected a full commit hash")
    return value


def _quoted(value: str) -> str:
    """An event or action name fit for a response: short, and only if it looks like one."""
    return repr(value) if EVENT_NAME_PATTERN.fullmatch(value) else "(unrecognised)"
