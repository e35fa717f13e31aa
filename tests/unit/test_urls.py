import pytest

from dsrouter.urls import InvalidWorkerURL, display_id_for, normalize_worker_url, worker_id_for


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
