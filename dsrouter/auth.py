"""Who may call what: an admin token for the control plane, API keys for inference.

Secrets come from router.toml, an environment variable or a file (so they need not sit in
the config; `config.load` reads them), are compared in constant time, and are never logged
or forwarded to workers.
"""

from __future__ import annotations

import hmac

from dsrouter.config import SecurityConfig

PUBLIC_PATHS = frozenset({"/", "/health", "/livez", "/readyz", "/openapi.json"})
"""Reachable without credentials: load balancers and orchestrators probe /health, /livez
and /readyz; `/` says what this is and where its docs are."""
METRICS_PATHS = frozenset({"/metrics", "/status"})
"""What operators look at: open, or behind the admin token with `security.protect_metrics`."""


class Auth:
    def __init__(self, security: SecurityConfig) -> None:
        """`security` as `config.load` returns it: secret sources already read."""
        self.admin_token = security.admin_token
        self.api_keys = [key.encode() for key in security.api_keys if key]
        self.protect_metrics = security.protect_metrics

    def admin_allowed(self, authorization: bytes | None) -> bool:
        if not self.admin_token:
            return True
        return _matches(authorization, [self.admin_token.encode()])

    def inference_allowed(self, authorization: bytes | None) -> bool:
        """API keys guard inference; the admin token is accepted there too."""
        if not self.api_keys:
            return True
        allowed = [*self.api_keys, *([self.admin_token.encode()] if self.admin_token else [])]
        return _matches(authorization, allowed)


def _matches(authorization: bytes | None, secrets: list[bytes]) -> bool:
    if not authorization or authorization[:7].lower() != b"bearer ":
        return False
    presented = authorization[7:].strip()
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(presented, secret)
    return ok
