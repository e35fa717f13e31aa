"""Worker URL normalisation and the SSRF guard for registering workers.

A worker is identified by its normalised URL everywhere (registry keys, `worker_id`), so
registering `http://Host:1/` and `http://host:1` must give the same string. The rules keep the
contract of the routers dsrouter succeeds (see shared/SEEDS.md).

The blocklist (`check_host_allowed`) judges a host by what it says, without DNS: it runs in
synchronous code (config parsing, the registry) and on every registration. An IP written in
any form the resolver reads as one (`2852039166`, `0xa9fea9fe`, `::ffff:169.254.169.254`) is
checked as that IP; other host names only against `BLOCKED_HOSTNAMES`. A name that resolves
to a blocked address is stopped by `security.allowed_worker_networks` (`check_allowlist`,
which resolves), not here.

Hosts are ASCII. A resolver reads more than it is given: before any DNS lookup Python's
`getaddrinfo` maps a `str` host through the IDNA codec, whose NFKC step turns full-width and
circled digits and the ideographic full stop into `169.254.169.254`. Checking the text would
miss that, and a host the codec cannot encode at all (`a..b`, a 64-character label) raised
from inside the health prober. So a host must be an IPv6 literal or ASCII labels the codec
accepts as they are (`_DNS_LABEL`); an internationalised name is written in its `xn--` form.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote, urlsplit

import trio

RESOLVE_TIMEOUT_S = 5.0
"""A registration waits at most this long for DNS (allowlist check), never forever."""
BLOCKED_HOSTNAMES = frozenset(
    {
        "metadata.google.internal",
        "metadata",  # GCE (the short name via its search domain)
        "instance-data.ec2.internal",
        "instance-data",  # EC2
    }
)
METADATA_IP = ipaddress.ip_address("169.254.169.254")
BLOCKED_IPS = frozenset(
    {
        METADATA_IP,  # AWS, GCP, Azure, OCI, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS (IPv6)
        ipaddress.ip_address("fd20:ce::254"),  # GCP (IPv6-only instances)
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud (legacy)
    }
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_DNS_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
MAX_HOST_NAME = 253
"""Longest name DNS (and the IDNA codec) accepts, without the trailing dot."""


class InvalidWorkerURL(ValueError):
    """The URL cannot name a worker; the message is safe to show to the client."""


def normalize_worker_url(raw: str) -> str:
    """Return the canonical form of a worker URL or raise `InvalidWorkerURL`.

    Canonical means: http/https only, scheme and host lower-cased, IPv6 hosts bracketed, an
    IPv4 address in any numeric form written dotted-decimal (`2130706433` is `127.0.0.1`: the
    same worker), an explicit port kept as given, no trailing slash, and nothing after the
    authority. Blocked hosts (cloud metadata, link-local) are rejected here so no caller can
    forget the check.
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
    if "[" in parts.netloc and ":" not in host:
        raise InvalidWorkerURL(f"worker host [{host}] in brackets must be an IPv6 address")
    check_host_syntax(host)
    check_host_allowed(host)
    ipv4 = numeric_ipv4(host)
    if ipv4 is not None:
        host = str(ipv4)
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}"


def check_host_syntax(host: str) -> None:
    """Reject a host the connectors would read differently from us, or could not encode.

    An IPv6 literal must parse as one. Anything else must be ASCII dot-separated labels of
    1 to 63 letters, digits, `-` or `_` (one trailing dot allowed), at most 253 characters:
    exactly what the IDNA codec passes through unchanged, so the name the blocklist judges
    is the name that is resolved, and resolving it cannot raise `UnicodeError`.
    """
    if not host.isascii():
        raise InvalidWorkerURL(
            f"worker host {host!r} is not ASCII: write an internationalised name in its "
            "xn-- (punycode) form"
        )
    if ":" in host:
        if _host_ip(host) is None:
            raise InvalidWorkerURL(f"worker host {host!r} is not a valid IPv6 address")
        return
    name = host.removesuffix(".")
    if len(name) > MAX_HOST_NAME or not all(_DNS_LABEL.fullmatch(p) for p in name.split(".")):
        raise InvalidWorkerURL(
            f"worker host {host!r} is not a valid host name: labels of 1-63 letters, "
            f"digits, '-' or '_' separated by single dots, at most {MAX_HOST_NAME} characters"
        )


def check_host_allowed(host: str) -> None:
    """Reject hosts that would let a caller make the router talk to cloud metadata services.

    Blocked: `BLOCKED_HOSTNAMES`, `BLOCKED_IPS` and every link-local address, also written as
    a number the resolver accepts or embedded in an IPv6 address (IPv4-mapped, -compatible,
    NAT64, 6to4). A trailing dot changes nothing (`metadata.google.internal.`).
    """
    name = host.lower().removesuffix(".")
    if name in BLOCKED_HOSTNAMES:
        raise InvalidWorkerURL(f"worker host {host!r} is blocked (cloud metadata service)")
    ip = _host_ip(name)
    if ip is None:
        return
    for candidate in (ip, *_embedded_ipv4(ip)):
        if candidate in BLOCKED_IPS:
            raise InvalidWorkerURL(f"worker host {host!r} is blocked (cloud metadata service)")
        if candidate.is_link_local:
            raise InvalidWorkerURL(f"worker host {host!r} is blocked (link-local address)")


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address `host` names by number, or None if it is no number.

    The rules are `inet_aton`'s, which getaddrinfo (and so the HTTP client) applies before
    any DNS lookup: one to four dot-separated parts, each decimal, octal (leading `0`) or hex
    (`0x`); the last part fills the remaining bytes (`169.254.43518` is `169.254.169.254`).
    """
    parts = host.split(".")
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        return None
    values = [
        int(p, 16) if p[:2] in ("0x", "0X") else int(p, 8) if p[0] == "0" else int(p) for p in parts
    ]
    *head, last = values
    if any(value > 255 for value in head) or last >= 256 ** (5 - len(values)):
        return None
    return ipaddress.IPv4Address(sum(v << (24 - 8 * i) for i, v in enumerate(head)) + last)


def _host_ip(name: str) -> IPAddress | None:
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name.split("%", 1)[0])  # a zone id changes no address
        except ValueError:
            return None
    return numeric_ipv4(name)


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches on the IPv4 side of a host, gateway or relay."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    embedded = [ip.ipv4_mapped, ip.sixtofour, low32 if ip in _NAT64 or int(ip) >> 32 == 0 else None]
    return [address for address in embedded if address is not None]


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
    host = (urlsplit(url).hostname or "").lower()
    names = {entry.lower() for entry in allowed if not _is_network(entry)}
    networks = [
        ipaddress.ip_network(entry, strict=False) for entry in allowed if _is_network(entry)
    ]
    if host in names:
        return
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        infos = None
        with trio.move_on_after(RESOLVE_TIMEOUT_S):
            try:
                infos = await trio.socket.getaddrinfo(host, None)
            except OSError as exc:
                raise InvalidWorkerURL(f"worker host {host!r} does not resolve: {exc}") from None
        if infos is None:
            raise InvalidWorkerURL(
                f"worker host {host!r} did not resolve within {RESOLVE_TIMEOUT_S:g}s"
            ) from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if addresses and all(any(a in net for net in networks) for a in addresses):
        return
    raise InvalidWorkerURL(
        f"worker host {host!r} is blocked: not in security.allowed_worker_networks"
    )


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True
