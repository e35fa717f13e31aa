"""Who may call what: an admin token for the control plane, API keys for inference.

Secrets come from router.toml, an environment variable or a file (so they need not sit in
the config; `config.load` reads them), are compared in constant time, and are never logged
or forwarded to workers.
"""

from __future__ import annotations

import hmac
from typing import TypeVar

from dsrouter.config import SecurityConfig, TenantsConfig
from dsrouter.tenants import ADMIN_TENANT, DEFAULT_TENANT, Tenant

T = TypeVar("T")

PUBLIC_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/openapi.json"})
"""Reachable without credentials: load balancers and orchestrators probe /health, /livez
and /readyz; `/` says what this is and where its docs are."""
METRICS_PATHS = frozenset({"/metrics", "/status"})
"""What operators look at: open, or behind the admin token with `security.protect_metrics`."""


class Auth:
    def __init__(self, security: SecurityConfig, tenants: TenantsConfig) -> None:
        """`security` as `config.load` returns it: secret sources already read."""
        self.admin_token = security.admin_token
        self.protect_metrics = security.protect_metrics
        self.default_tenant = Tenant.builtin(DEFAULT_TENANT, tenants)
        self.tenants: list[tuple[bytes, Tenant]] = [
            (key.encode(), self.default_tenant) for key in security.api_keys if key
        ]
        self.tenants += [
            (entry.key.encode(), Tenant.from_key(entry, tenants)) for entry in security.keys
        ]
        if self.admin_token:
            admin = Tenant.builtin(ADMIN_TENANT, tenants)
            self._admin = [(self.admin_token.encode(), admin)]
        else:
            self._admin = []

    def admin_allowed(self, authorization: bytes | None) -> bool:
        if not self.admin_token:
            return True
        return _matches(authorization, [self.admin_token.encode()])

    def inference_allowed(self, authorization: bytes | None) -> bool:
        return self.inference_tenant(authorization) is not None

    def inference_tenant(self, authorization: bytes | None) -> Tenant | None:
        """The tenant whose key the request presents, None if it may not call inference.

        API keys guard inference; the admin token is accepted there too. A router without
        keys serves everyone as the default tenant.
        """
        if not self.tenants:
            return self.default_tenant
        return _match(authorization, [*self.tenants, *self._admin])


def _matches(authorization: bytes | None, secrets: list[bytes]) -> bool:
    return _match(authorization, [(secret, True) for secret in secrets]) is not None


def _match(authorization: bytes | None, secrets: list[tuple[bytes, T]]) -> T | None:
    """The value of the secret presented as a bearer token; every secret is compared, in
    constant time, so the answer's timing does not tell which one nearly matched."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return None
    presented = authorization[7:].strip()
    found = None
    for secret, value in secrets:
        if hmac.compare_digest(presented, secret):
            found = value
    return found
