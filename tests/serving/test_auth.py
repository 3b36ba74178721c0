"""Keys files: JSON or YAML, fnmatch adapter patterns, admin, open mode."""

from __future__ import annotations

import json

import pytest

from iapt.serving.auth import KeyRing


def test_keys_file_json_and_yaml(tmp_path):
    entries = {"sk-a": {"tenant": "alice", "adapters": ["alice-*"]}, "sk-b": {"tenant": "bob", "adapters": "bob",
                                                                             "base": False},
               "sk-root": {"admin": True}}
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


@pytest.mark.parametrize("text", ["[1, 2]", "{}", '{"k": {"adapters": ["a"]}}', '{"k": {"tenant": "t", "oops": 1}}',
                                  "{not json"])
def test_bad_keys_files_say_what_is_wrong(tmp_path, text):
    (tmp_path / "keys.json").write_text(text)
    with pytest.raises(ValueError, match="keys file"):
        KeyRing.from_file(tmp_path / "keys.json")


def test_open_mode_lets_everyone_in():
    assert KeyRing(None).authenticate(None).admin
