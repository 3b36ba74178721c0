"""API keys: who is calling, and which models (adapters) they may use.

Keys file (JSON or YAML), a mapping from key to entry, optionally under a top-level ``keys:``::

    sk-alice-1: {tenant: alice, adapters: ["alice-*"]}   # fnmatch patterns; the base model is allowed
    sk-bob-1:   {tenant: bob, adapters: [bob-sql], base: false}
    sk-ops:     {tenant: ops, admin: true}               # may load/unload adapters and use every model

Without a keys file the server is open: every caller is an admin (fine on 127.0.0.1, not beyond).
"""

from __future__ import annotations

import fnmatch
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Entry(BaseModel):
    """One key's entry; strict: ``admin: "false"`` or ``adapters: null`` is an error, not a guess."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: str | None = Field(None, min_length=1)
    adapters: str | list[str] = Field(default_factory=list)
    admin: bool = False
    base: bool = True


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"the key {key!r} appears twice")
        out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in out
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    tenant: str
    adapters: tuple[str, ...] = ()
    admin: bool = False
    base: bool = True

    def may_use(self, model: str, is_base: bool) -> bool:
        if self.admin:
            return True
        if is_base:
            return self.base
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.adapters)


OPEN = Principal(tenant="anonymous", adapters=("*",), admin=True)


class KeyRing:
    """Maps API keys to principals; ``KeyRing(None)`` is the open mode."""

    def __init__(self, entries: dict[str, Principal] | None = None) -> None:
        self.entries = entries

    @property
    def open(self) -> bool:
        return self.entries is None

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Parse a JSON or YAML keys file strictly; raises ValueError naming the entry on anything doubtful.

        Strict because a lax reading grants access: ``bool("false")`` is True, YAML's ``~`` key is None,
        a duplicated key silently keeps the last entry, an empty key matches ``Authorization: Bearer``.
        """
        text = Path(path).read_text()
        try:
            if str(path).endswith(".json"):
                data = json.loads(text, object_pairs_hook=_no_duplicates)
            else:
                data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        except (json.JSONDecodeError, yaml.YAMLError, _Duplicate) as exc:
            raise ValueError(f"keys file {path} is not valid JSON/YAML: {exc}") from None
        if isinstance(data, dict) and set(data) == {"keys"} and isinstance(data["keys"], dict):
            data = data["keys"]
        if not isinstance(data, dict) or not data:
            raise ValueError(f"keys file {path} must map API keys to entries like {{tenant: alice, adapters: [...]}}")
        entries = {}
        for number, (key, entry) in enumerate(data.items(), start=1):
            where = f"keys file {path}: entry #{number}"
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise ValueError(
                    f"{where}: the API key must be a non-empty string without surrounding spaces, "
                    f"got {key!r}; quote it in YAML (~ is null there)"
                )
            if not isinstance(entry, dict):
                raise ValueError(
                    f"{where} must be a mapping like {{tenant: alice, adapters: [...]}}, "  # noqa: TRY004
                    f"got {type(entry).__name__}"
                )
            try:
                parsed = _Entry.model_validate(entry)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"{where}: {problems}") from None
            tenant = parsed.tenant if parsed.tenant is not None else ("admin" if parsed.admin else None)
            if not tenant:
                raise ValueError(f"{where} needs a 'tenant' name")
            adapters = [parsed.adapters] if isinstance(parsed.adapters, str) else parsed.adapters
            entries[key] = Principal(tenant, tuple(adapters), parsed.admin, parsed.base)
        return cls(entries)

    def with_api_key(self, key: str) -> KeyRing:
        """This ring plus ``key`` with access to everything (vLLM's ``--api-key``); the API is then not open.

        Refused if the key is blank, has surrounding spaces (it could never be sent back) or is in the ring
        already (which entry wins would be a guess)."""
        if not isinstance(key, str) or not key.strip() or key != key.strip():
            raise ValueError("--api-key must be a non-empty string without surrounding spaces")
        entries = dict(self.entries or {})
        if key in entries:
            raise ValueError("--api-key is also a key in the keys file; use one or the other")
        entries[key] = Principal(tenant="api-key", adapters=("*",), admin=True)
        return KeyRing(entries)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization: Bearer KEY`` header, or None (401)."""
        if self.entries is None:
            return OPEN
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        given = authorization[7:].strip().encode()
        if not given:
            return None
        found = None
        for key, principal in self.entries.items():  # constant-time compare against every key
            if hmac.compare_digest(given, key.encode()):
                found = principal
        return found
