import ipaddress
import socket
from urllib.parse import urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dsrouter.urls import (
    InvalidWorkerURL,
    display_id_for,
    normalize_worker_url,
    numeric_ipv4,
    worker_id_for,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://127.0.0.1:10090", "http://127.0.0.1:10090"),
        ("http://127.0.0.1:10090/", "http://127.0.0.1:10090"),
        ("HTTP://GPU-Node-3:30000", "http://gpu-node-3:30000"),
        ("https://example.com", "https://example.com"),
        ("http://[::1]:8000/", "http://[::1]:8000"),
        ("http://[FE80::1%25eth0]:8000", None),
        ("  http://localhost:9  ", "http://localhost:9"),
    ],
)
def test_urls_are_normalised(raw: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(InvalidWorkerURL):
            normalize_worker_url(raw)
    else:
        assert normalize_worker_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "required"),
        ("ftp://host:1", "http"),
        ("localhost:9000", "http"),
        ("http://user:pw@host:1", "credentials"),
        ("http://host:1/v1", "path"),
        ("http://host:1/?a=b", "query"),
        ("http://host:99999", "invalid"),
        ("http://169.254.169.254", "blocked"),
        ("http://169.254.10.1:80", "blocked"),
        ("http://metadata.google.internal", "blocked"),
        ("http://[fe80::1]:80", "blocked"),
        ("http://[::ffff:169.254.169.254]:80", "blocked"),
    ],
)
def test_bad_urls_are_rejected_with_a_reason(raw: str, fragment: str) -> None:
    with pytest.raises(InvalidWorkerURL, match=fragment):
        normalize_worker_url(raw)


def test_worker_id_is_percent_encoded_without_safe_characters() -> None:
    url = normalize_worker_url("http://127.0.0.1:10090/")
    assert worker_id_for(url) == "http%3A%2F%2F127.0.0.1%3A10090"
    assert display_id_for(url) == "127.0.0.1:10090"
    assert display_id_for("http://[::1]:5") == "[::1]:5"


@pytest.mark.parametrize(
    "raw",
    [
        "http://2852039166",
        "http://0xa9fea9fe:80",
        "http://0XA9FEA9FE",
        "http://169.254.43518",
        "http://169.0xfe.0xa9fe",
        "http://0251.0376.0251.0376",
        "http://0x00000000a9fea9fe",
        "http://169.254.169.254.",
        "http://METADATA.google.internal.",
        "http://metadata",
        "http://instance-data.ec2.internal",
        "http://[fd00:ec2::254]",
        "http://[fd00:ec2::254%25eth0]:80",
        "http://[fd20:ce::254]",
        "http://[::ffff:a9fe:a9fe]",
        "http://[::169.254.169.254]",
        "http://[64:ff9b::169.254.169.254]",
        "http://[2002:a9fe:a9fe::1]",
        "http://2851995905",  # 169.254.0.1, link-local
        "http://[::ffff:169.254.0.1]",
    ],
)
def test_metadata_and_link_local_hosts_are_blocked_in_every_spelling(raw: str) -> None:
    with pytest.raises(InvalidWorkerURL, match="blocked"):
        normalize_worker_url(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://2130706433:5", "http://127.0.0.1:5"),
        ("http://0x7f000001:5", "http://127.0.0.1:5"),
        ("http://127.1:5", "http://127.0.0.1:5"),
        ("http://012.0.0.1:5", "http://10.0.0.1:5"),
        ("http://[::ffff:127.0.0.1]:5", "http://[::ffff:127.0.0.1]:5"),
        ("http://1.2.3.4.5:5", "http://1.2.3.4.5:5"),
        ("http://0x:5", "http://0x:5"),
        ("http://08.1.1.1:5", "http://08.1.1.1:5"),
    ],
)
def test_numeric_ipv4_hosts_are_written_dotted_so_one_worker_has_one_id(
    raw: str, expected: str
) -> None:
    assert normalize_worker_url(raw) == expected


@given(
    st.lists(st.text("0123456789abcdefxX", min_size=1, max_size=12), min_size=1, max_size=5).map(
        ".".join
    )
)
@example("4294967295")
@example("4294967296")
@example("1.16777216")
@example("0x")
def test_numeric_ipv4_reads_hosts_exactly_as_inet_aton(host: str) -> None:
    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        expected = None
    assert numeric_ipv4(host) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "http://a..b:1",
        "http://.a:1",
        "http://\u00fc_.invalid:1",
        "http://\u00fc.example:1",
        "http://" + "a" * 64 + ".example:1",
        "http://" + ".".join(["a" * 63] * 4) + ":1",
        "http://a!b:1",
        "http://[v1.x]:1",
        # Unicode spellings of addresses: NFKC in the resolver's IDNA step makes them
        # 169.254.169.254 and 127.0.0.1 at connect time.
        "http://\u2460\u2465\u2468.\u2461\u2464\u2463.\u2460\u2465\u2468.\u2461\u2464\u2463",
        "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14",
        "http://169\u3002254\u3002169\u3002254",
        "http://127\uff0e0\uff0e0\uff0e1:1",
        "http://metadata\u3002google\u3002internal",
    ],
)
def test_hosts_the_connector_would_reencode_or_fail_on_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidWorkerURL, match="host"):
        normalize_worker_url(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "http://100.100.100.200",
        "http://1684301000",  # 100.100.100.200 as one number
        "http://[::ffff:100.100.100.200]:80",
        "http://192.0.0.192",
        "http://0xc00000c0:80",
        "http://[fd00:ec2::254]:80",
    ],
)
def test_other_clouds_metadata_addresses_are_blocked(raw: str) -> None:
    with pytest.raises(InvalidWorkerURL, match="blocked"):
        normalize_worker_url(raw)


@given(st.text(max_size=40))
@example("a..b")
@example("\u00fc_.invalid")
@example("\u2460\u2465\u2468.\u2461\u2464\u2463.\u2460\u2465\u2468.\u2461\u2464\u2463")
@example("a" * 64)
def test_every_accepted_host_is_ascii_and_encodes_as_itself(host: str) -> None:
    """What the blocklist judged is what the connectors resolve: trio passes an ASCII host
    through, Python's getaddrinfo sends it through the IDNA codec, httpx parses it."""
    import httpx

    try:
        url = normalize_worker_url(f"http://{host}:1")
    except InvalidWorkerURL:
        return
    name = urlsplit(url).hostname
    assert name is not None and name.isascii()
    if ":" not in name:
        assert name.encode("idna").decode() == name
    assert httpx.URL(url + "/health").host == name
