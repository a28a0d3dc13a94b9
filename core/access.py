"""Roles and access for the HTTP API: who may call which endpoint.

Browser clients (no key) get ``default_role``. API clients send ``X-API-Key: <key>`` (or
``Authorization: Bearer <key>``); keys are configured as SHA-256 digests or plain keys (hashed at
start-up) and compared in constant time against every configured key, so timing tells nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .settings import Settings


class AccessDenied(Exception):
    """A call the client may not make: ``status`` is 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Key:
    digest: bytes
    role: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class AccessPolicy:
    """Decides, per request, the caller's role and whether it may call an API."""

    def __init__(self, settings: Settings) -> None:
        self.roles = {name: set(apis) for name, apis in settings.roles.items()}
        self.default_role = settings.default_role
        self._keys = [
            _Key(
                bytes.fromhex(k.sha256) if k.sha256 else _digest(k.key.get_secret_value() if k.key else ""),
                k.role,
            )
            for k in settings.api_keys
        ]

    def role_of(self, presented_key: str | None) -> str:
        """The role for a presented key (None: a browser client). A wrong key is a 401."""
        if presented_key is None:
            return self.default_role
        digest = _digest(presented_key)
        role = None
        for key in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(digest, key.digest):
                role = key.role
        if role is None:
            raise AccessDenied(401, "invalid API key: send a configured key in the X-API-Key header")
        return role

    def allows(self, role: str, api: str) -> bool:
        apis = self.roles.get(role, set())
        return "*" in apis or api in apis

    def check(self, presented_key: str | None, api: str) -> str:
        """The caller's role if it may call ``api``; otherwise ``AccessDenied`` (401 or 403)."""
        role = self.role_of(presented_key)
        if self.allows(role, api):
            return role
        if presented_key is None:
            raise AccessDenied(401, f"{api} needs an API key: send it in the X-API-Key header")
        raise AccessDenied(
            403, f"role {role!r} may not call {api}; allowed: {sorted(self.roles.get(role, set()))}"
        )


def presented_key(headers: dict[str, str] | object) -> str | None:
    """The API key a request presents, from ``X-API-Key`` or ``Authorization: Bearer``."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    key = get("x-api-key")
    if key:
        return str(key)
    auth = get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip()) or None
    return None
