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
        """Parse a JSON or YAML keys file; raises ValueError with the offending key on a bad entry."""
        text = Path(path).read_text()
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"keys file {path} is not valid JSON/YAML: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("keys"), dict):
            data = data["keys"]
        if not isinstance(data, dict) or not data:
            raise ValueError(f"keys file {path} must map API keys to entries like {{tenant: alice, adapters: [...]}}")
        entries = {}
        for number, (key, entry) in enumerate(data.items(), start=1):
            tenant = entry.get("tenant", "admin" if entry.get("admin") else None) if isinstance(entry, dict) else None
            if not isinstance(tenant, str):
                raise ValueError(f"keys file {path}: entry #{number} needs a 'tenant' name")  # noqa: TRY004
            adapters = entry.get("adapters", [])
            adapters = [adapters] if isinstance(adapters, str) else adapters
            unknown = set(entry) - {"tenant", "adapters", "admin", "base"}
            if unknown or not all(isinstance(a, str) for a in adapters):
                raise ValueError(f"keys file {path}: bad entry #{number} ({sorted(unknown) or adapters})")
            entries[str(key)] = Principal(tenant, tuple(adapters), bool(entry.get("admin")),
                                          bool(entry.get("base", True)))
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization: Bearer KEY`` header, or None (401)."""
        if self.entries is None:
            return OPEN
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        given = authorization[7:].strip().encode()
        found = None
        for key, principal in self.entries.items():  # constant-time compare against every key
            if hmac.compare_digest(given, key.encode()):
                found = principal
        return found
