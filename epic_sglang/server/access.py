"""Who may do what: API keys, the namespaces each may use, and admin rights.

- No key configured: one trust domain; every caller may use every namespace and the admin
  routes (a local server).
- `--api-key K`: one shared user key; it may use every namespace (one tenant holding it).
- `--api-keys FILE`: a JSON list of {"key", "name", "namespaces"?, "admin"?}; a key may use
  only its namespaces (default: the one named after it), the first being where its requests
  go when they name none.
- `--admin-api-key A` (or an "admin": true entry): everything a user key can, in every
  namespace, plus the admin routes (/v1/documents, /flush_cache) and any request's abort.

A document is readable (by id, by /v1/rag, by transparent detection, by kv_hints.doc_ids)
only from its own namespace, so a key sees exactly the documents of the namespaces it may
use, and an id from elsewhere reads as unknown (404), like one that does not exist.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from epic_sglang.errors import InvalidRequest

DEFAULT_NAMESPACE = "default"


class Forbidden(InvalidRequest):
    """The key may not do this (HTTP 403)."""
    status = 403


@dataclass(frozen=True)
class Grant:
    """What one caller may do."""
    name: str
    namespaces: frozenset[str] | None  # None: every namespace
    admin: bool = False
    default_namespace: str = DEFAULT_NAMESPACE

    def namespace(self, requested: str | None) -> str:
        """The namespace a request works in: the one it names (if this caller may use it),
        else this caller's default."""
        if requested is None:
            return self.default_namespace
        if not isinstance(requested, str) or not requested:
            raise InvalidRequest("namespace must be a non-empty string")
        if self.namespaces is not None and requested not in self.namespaces:
            raise Forbidden(f"this API key may not use namespace {requested!r}")
        return requested


OPEN = Grant("anonymous", None, admin=True)


class AccessPolicy:
    def __init__(self, api_key: str | None = None, admin_api_key: str | None = None, api_keys: Path | None = None):
        self._keys: list[tuple[str, Grant]] = []
        if admin_api_key:
            self._keys.append((admin_api_key, Grant("admin", None, admin=True)))
        if api_key:
            self._keys.append((api_key, Grant("user", None)))
        if api_keys is not None:
            self._keys += load_keys(api_keys)

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def grant(self, token: str | None) -> Grant | None:
        """The caller's grant: OPEN when no key is configured, None for a missing or wrong key."""
        if not self._keys:
            return OPEN
        if token is None:
            return None
        # compare every key in constant time, so timing tells nothing about a near miss
        found = [g for key, g in self._keys if hmac.compare_digest(key.encode("latin-1", "replace"),
                                                                     token.encode("latin-1", "replace"))]
        return found[0] if found else None


def load_keys(path: Path) -> list[tuple[str, Grant]]:
    """The --api-keys file: [{"key": "...", "name": "alice", "namespaces": ["alice", "shared"], "admin": false}]."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"--api-keys {path}: {e}") from e
    if not isinstance(entries, list):
        raise InvalidRequest(f"--api-keys {path}: expected a JSON list of key objects")
    out, names = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e["key"] \
                or not isinstance(e.get("name"), str) or not e["name"] or set(e) - {"key", "name", "namespaces", "admin"}:
            raise InvalidRequest(f"--api-keys {path}: entry {i} needs a non-empty key and name "
                                 "(and optionally namespaces, admin)")
        spaces = e.get("namespaces", [e["name"]])
        if not isinstance(spaces, list) or not spaces or any(not isinstance(s, str) or not s for s in spaces):
            raise InvalidRequest(f"--api-keys {path}: entry {i} namespaces must be a non-empty list of names")
        if e["name"] in names:
            raise InvalidRequest(f"--api-keys {path}: name {e['name']!r} appears twice")
        names.add(e["name"])
        admin = e.get("admin", False)
        if not isinstance(admin, bool):
            raise InvalidRequest(f"--api-keys {path}: entry {i} admin must be true or false")
        out.append((e["key"], Grant(e["name"], None if admin else frozenset(spaces), admin, spaces[0])))
    return out
