"""Integration fixtures live in tests/platform_fixtures.py (registered by the root conftest), so
the e2e suite shares the same session services."""
