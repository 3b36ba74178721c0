"""Keys files: JSON or YAML, fnmatch adapter patterns, admin, open mode."""

from __future__ import annotations

import json

import pytest

from iapt.serving.auth import KeyRing


def test_keys_file_json_and_yaml(tmp_path):
    entries = {
        "sk-a": {"tenant": "alice", "adapters": ["alice-*"]},
        "sk-b": {"tenant": "bob", "adapters": "bob", "base": False},
        "sk-root": {"admin": True},
    }
    (tmp_path / "keys.json").write_text(json.dumps(entries))
    (tmp_path / "keys.yaml").write_text("keys:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in entries.items()))
    for name in ("keys.json", "keys.yaml"):
        ring = KeyRing.from_file(tmp_path / name)
        alice, bob, root = (ring.authenticate(f"Bearer {k}") for k in ("sk-a", "sk-b", "sk-root"))
        assert alice.tenant == "alice" and alice.may_use("alice-sql", False) and not alice.may_use("bob", False)
        assert alice.may_use("base", True) and not bob.may_use("base", True) and bob.may_use("bob", False)
        assert root.admin and root.may_use("anything", False) and not alice.admin
        assert ring.authenticate("Bearer sk-x") is None and ring.authenticate(None) is None
        assert ring.authenticate("sk-a") is None  # not a bearer header


@pytest.mark.parametrize(
    "text", ["[1, 2]", "{}", '{"k": {"adapters": ["a"]}}', '{"k": {"tenant": "t", "oops": 1}}', "{not json"]
)
def test_bad_keys_files_say_what_is_wrong(tmp_path, text):
    (tmp_path / "keys.json").write_text(text)
    with pytest.raises(ValueError, match="keys file"):
        KeyRing.from_file(tmp_path / "keys.json")


def test_open_mode_lets_everyone_in():
    assert KeyRing(None).authenticate(None).admin


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('sk-a: {tenant: a, admin: "false"}', r"entry #1: admin: Input should be a valid boolean"),
        ("sk-a: {tenant: a, base: 'no'}", r"entry #1: base: Input should be a valid boolean"),
        ("sk-a: {tenant: a, admin: 1}", r"entry #1: admin: Input should be a valid boolean"),
        ('"": {tenant: a}', r"entry #1: the API key must be a non-empty string"),
        ("sk-a: {tenant: a}\n'  ': {tenant: b}", r"entry #2: the API key must be a non-empty string"),
        ("~: {tenant: a}", r"entry #1: the API key must be a non-empty string.*None"),
        ("123: {tenant: a}", r"entry #1: the API key must be a non-empty string"),
        ("sk-a: {tenant: a}\nsk-a: {tenant: b, admin: true}", r"'sk-a' appears twice"),
        ("sk-a: {tenant: a, adapters: null}", r"entry #1: adapters"),
        ("sk-a: {tenant: a, adapters: [1]}", r"entry #1: adapters"),
        ("sk-a: {tenant: ''}", r"entry #1: tenant"),
        ("sk-a: null", r"entry #1 must be a mapping"),
    ],
)
def test_keys_file_is_type_checked_strictly(tmp_path, text, problem):
    """Lax parsing grants access: "false" read as true, ~ as the key "None", a duplicate keeping the last."""
    (tmp_path / "keys.yaml").write_text(text + "\n")
    with pytest.raises(ValueError, match=problem):
        KeyRing.from_file(tmp_path / "keys.yaml")


def test_duplicate_key_in_json_keys_file(tmp_path):
    (tmp_path / "keys.json").write_text('{"sk-a": {"tenant": "a"}, "sk-a": {"tenant": "b", "admin": true}}')
    with pytest.raises(ValueError, match="'sk-a' appears twice"):
        KeyRing.from_file(tmp_path / "keys.json")


def test_an_empty_bearer_token_never_authenticates(tmp_path):
    (tmp_path / "keys.yaml").write_text("sk-a: {tenant: a, admin: false, base: false}\n")
    ring = KeyRing.from_file(tmp_path / "keys.yaml")
    assert ring.authenticate("Bearer ") is None and ring.authenticate("Bearer    ") is None
    assert not ring.authenticate("Bearer sk-a").admin and not ring.authenticate("Bearer sk-a").base
