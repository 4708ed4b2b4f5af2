"""Keyed hashing of identifiers and the site secret."""

import os
import stat

import pytest

from bonescan_model.io.deid import keyed_hash, load_or_create_secret

SECRET = b"s" * 32


def test_keyed_hash_is_stable_hex():
    h = keyed_hash(SECRET, "PID-12345")
    assert h == keyed_hash(SECRET, "PID-12345")
    assert len(h) == 64 and int(h, 16) >= 0


def test_keyed_hash_depends_on_secret_and_value():
    assert keyed_hash(SECRET, "PID-12345") != keyed_hash(b"t" * 32, "PID-12345")
    assert keyed_hash(SECRET, "PID-12345") != keyed_hash(SECRET, "PID-12346")


def test_keyed_hash_part_boundaries_matter():
    assert keyed_hash(SECRET, "ab", "c") != keyed_hash(SECRET, "a", "bc")
    assert keyed_hash(SECRET, "abc") != keyed_hash(SECRET, "ab", "c")
    assert keyed_hash(SECRET, "a", "") != keyed_hash(SECRET, "", "a")


def test_keyed_hash_does_not_contain_the_value():
    assert "PID-12345" not in keyed_hash(SECRET, "PID-12345")


@pytest.mark.parametrize("secret", [b"", b"short", "a str of 32 characters..........."])
def test_keyed_hash_rejects_weak_secret(secret):
    with pytest.raises(ValueError):
        keyed_hash(secret, "x")


def test_secret_is_created_private_and_reused(tmp_path):
    path = tmp_path / "site" / "secret.key"
    first = load_or_create_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp file left


def test_secrets_differ_between_sites(tmp_path):
    assert load_or_create_secret(tmp_path / "a") != load_or_create_secret(tmp_path / "b")


def test_existing_short_secret_is_rejected(tmp_path):
    path = tmp_path / "secret.key"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="secret"):
        load_or_create_secret(path)
