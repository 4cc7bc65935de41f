"""The platform's secrets: generated once, kept under the run dir with mode 0600.

Every Airflow process must share the same JWT secret, API secret key and Fernet key, and the
simple auth manager reads the admin password from its passwords file. None of them is ever in
the repository or in a global config file.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from airmlops.paths import atomic_write_text
from airmlops.platform.config import ADMIN_USER, PlatformConfig

SECRETS_FILE = "secrets.json"


@dataclass(frozen=True)
class PlatformSecrets:
    """Keys every Airflow process must share, and the admin password of the simple auth manager."""

    jwt_secret: str
    api_secret_key: str
    fernet_key: str
    admin_password: str = field(repr=False)


def ensure_secrets(config: PlatformConfig) -> PlatformSecrets:
    """Read the platform's secrets, generating and storing any that are missing. Idempotent."""
    keys = _ensure_keys(config.run_dir / SECRETS_FILE)
    return PlatformSecrets(
        jwt_secret=keys["jwt_secret"],
        api_secret_key=keys["api_secret_key"],
        fernet_key=keys["fernet_key"],
        admin_password=_ensure_admin_password(config.passwords_file),
    )


def _ensure_keys(secrets_file: Path) -> dict[str, str]:
    """The shared keys in ``secrets_file``, any missing one generated and stored first."""
    stored: dict[str, str] = {}
    if secrets_file.exists():
        stored = json.loads(secrets_file.read_text())
    wanted = {
        "jwt_secret": lambda: secrets.token_urlsafe(48),
        "api_secret_key": lambda: secrets.token_urlsafe(48),
        "fernet_key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
    }
    missing = {k: make() for k, make in wanted.items() if not stored.get(k)}
    if missing:
        stored.update(missing)
        write_private(secrets_file, json.dumps(stored, indent=2) + "\n")
    return stored


def _ensure_admin_password(passwords_file: Path) -> str:
    """The admin's password in the simple auth manager's file, generated on first use."""
    passwords: dict[str, str] = {}
    if passwords_file.exists():
        passwords = json.loads(passwords_file.read_text() or "{}")
    if not passwords.get(ADMIN_USER):
        passwords[ADMIN_USER] = secrets.token_urlsafe(12)
        write_private(passwords_file, json.dumps(passwords) + "\n")
    return passwords[ADMIN_USER]


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` readable by the owner only."""
    atomic_write_text(path, text, mode=0o600)
