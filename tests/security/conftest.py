"""Fixtures of the security suite: the live platform an attacker can reach (live_target.py)."""

from live_target import attack_target, raw_http  # noqa: F401  (fixtures, registered by import)
