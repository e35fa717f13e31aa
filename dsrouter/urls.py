"""Worker URL normalisation and the SSRF guard for registering workers.

A worker is identified by its normalised URL everywhere (registry keys, `worker_id`), so
registering `http://Host:1/` and `http://host:1` must give the same string. The rules keep the
contract of the routers dsrouter succeeds (see shared/SEEDS.md).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote, urlsplit

BLOCKED_HOSTNAMES = frozenset({"metadata.google.internal", "metadata.google.internal."})
METADATA_IP = ipaddress.ip_address("169.254.169.254")


class InvalidWorkerURL(ValueError):
    """The URL cannot name a worker; the message is safe to show to the client."""


def normalize_worker_url(raw: str) -> str:
    """Return the canonical form of a worker URL or raise `InvalidWorkerURL`.

    Canonical means: http/https only, scheme and host lower-cased, IPv6 hosts bracketed, an
    explicit port kept as given, no trailing slash, and nothing after the authority. Blocked
    hosts (cloud metadata, link-local) are rejected here so no caller can forget the check.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidWorkerURL("worker url is required")
    text = raw.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidWorkerURL(f"invalid worker url {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidWorkerURL(f"worker url must start with http:// or https://, got {text!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidWorkerURL("worker url must not contain credentials")
    if parts.path not in ("", "/"):
        raise InvalidWorkerURL(f"worker url must not contain a path, got {parts.path!r}")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise InvalidWorkerURL("worker url must not contain a query or fragment")
    host = parts.hostname
    if not host:
        raise InvalidWorkerURL(f"worker url has no host: {text!r}")
    host = host.lower()
    check_host_allowed(host)
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}"


def check_host_allowed(host: str) -> None:
    """Reject hosts that would let a caller make the router talk to cloud metadata services."""
    if host in BLOCKED_HOSTNAMES:
        raise InvalidWorkerURL(f"worker host {host!r} is blocked (cloud metadata service)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip == METADATA_IP or ip.is_link_local:
        raise InvalidWorkerURL(f"worker host {host!r} is blocked (link-local address)")


def worker_id_for(url: str) -> str:
    """The machine id of a worker: its normalised URL percent-encoded with no safe characters."""
    return quote(url, safe="")


def display_id_for(url: str) -> str:
    """The human id of a worker: `host:port` as written in the URL."""
    return urlsplit(url).netloc


async def check_allowlist(url: str, allowed: list[str]) -> None:
    """With `security.allowed_worker_networks` set, the worker must be inside one of them.

    Entries are CIDRs or host names. A host given by name passes when it is listed by name,
    or when every address it resolves to lies in a listed network (so a name cannot be used
    to smuggle in an address outside the allowlist).
    """
    if not allowed:
        return
    import trio

    host = (urlsplit(url).hostname or "").lower()
    names = {entry.lower() for entry in allowed if not _is_network(entry)}
    networks = [ipaddress.ip_network(entry, strict=False) for entry in allowed
                if _is_network(entry)]
    if host in names:
        return
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await trio.socket.getaddrinfo(host, None)
        except OSError as exc:
            raise InvalidWorkerURL(f"worker host {host!r} does not resolve: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if addresses and all(any(a in net for net in networks) for a in addresses):
        return
    raise InvalidWorkerURL(
        f"worker host {host!r} is blocked: not in security.allowed_worker_networks")


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True
