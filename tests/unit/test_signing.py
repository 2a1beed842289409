"""The signing rule, called in-process: which versions a runtime with a key refuses, and why.

tests/integration/test_security.py and test_trust.py check the same refusals end to end,
as 409s from a real server; these check each rule of `signing` and `store.check_place` directly.
"""

from __future__ import annotations

import pytest

from framework.store import signing
from framework.errors import ConfigError, IntegrityError, StoreDamaged
from framework.store.base import check_place

KEY_A = b"a" * 16 + b"-signing-key-A"
KEY_B = b"b" * 16 + b"-signing-key-B"
ARTIFACT = b"\x80\x05 an artifact's bytes"
MANIFEST = {"name": "triple", "branch": "main", "version": 3, "python": "3.11.9", "source": "def triple(x): ..."}


def signed(artifact: bytes = ARTIFACT, manifest: dict = MANIFEST, key: bytes = KEY_A) -> dict:
    return {**manifest, "signed": signing.sign(artifact, manifest, key)}


def test_a_signed_version_verifies_with_its_key_only():
    m = signed()
    signing.verify(ARTIFACT, m, KEY_A)
    assert signing.signed_with(m, KEY_A) and not signing.signed_with(m, KEY_B)
    assert signing.signed_with(MANIFEST, None), "with signing off every version is acceptable"
    with pytest.raises(IntegrityError, match="signed with another key.*redeploy"):
        signing.verify(ARTIFACT, m, KEY_B)


def test_an_unsigned_version_is_refused_naming_it():
    with pytest.raises(IntegrityError, match=r"triple v3 on branch 'main' is not signed.*redeploy"):
        signing.verify(ARTIFACT, MANIFEST, KEY_A)
    assert not signing.signed_with(MANIFEST, KEY_A)


def test_one_flipped_artifact_byte_breaks_the_signature():
    flipped = bytearray(ARTIFACT)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(IntegrityError, match="does not match its signature"):
        signing.verify(bytes(flipped), signed(), KEY_A)


@pytest.mark.parametrize("field,value", [("branch", "other"), ("name", "quadruple"), ("version", 4),
                                         ("python", "3.0.0"), ("source", "def triple(x): return 0")])
def test_every_manifest_field_is_covered(field, value):
    with pytest.raises(IntegrityError, match="does not match its signature"):
        signing.verify(ARTIFACT, {**signed(), field: value}, KEY_A)


def test_a_signature_of_the_older_format_is_refused():
    m = signed()
    m["signed"] = {**m["signed"], "format": 1}
    with pytest.raises(IntegrityError, match="older format"):
        signing.verify(ARTIFACT, m, KEY_A)
    assert not signing.signed_with(m, KEY_A)


def test_key_ids_name_keys_without_revealing_them():
    assert signing.key_id(KEY_A) == signing.key_id(KEY_A) != signing.key_id(KEY_B)
    assert KEY_A.decode() not in signing.key_id(KEY_A)


def test_the_key_comes_from_the_environment_and_must_be_long(monkeypatch):
    monkeypatch.delenv(signing.ENV, raising=False)
    assert signing.current_key() is None
    monkeypatch.setenv(signing.ENV, KEY_A.decode())
    assert signing.current_key() == KEY_A
    monkeypatch.setenv(signing.ENV, "short")
    with pytest.raises(ConfigError, match=f"at least {signing.MIN_KEY_CHARS}"):
        signing.current_key()


def test_a_manifest_read_from_another_place_than_it_names_is_refused():
    assert check_place(MANIFEST, "main", "triple", 3) == MANIFEST
    for place in (("main", "triple", 4), ("other", "triple", 3), ("main", "quadruple", 3)):
        with pytest.raises(StoreDamaged, match="copied, linked or renamed"):
            check_place(MANIFEST, *place)
