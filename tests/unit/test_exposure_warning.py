"""The start-up warning about an open admin API: loopback hosts are not exposed.

The warning is only worth something if it is not raised for hosts nobody else can reach:
an operator who binds 127.0.0.2 (all of 127.0.0.0/8 is loopback) would learn to ignore it.
"""

import logging

import pytest

from dsrouter.auth import Auth
from dsrouter.config import Config, SecurityConfig, ServerConfig, TenantsConfig
from dsrouter.daemon import _warn_if_exposed


def _warned(caplog: pytest.LogCaptureFixture, host: str, token: str = "") -> bool:
    caplog.clear()
    config = Config(server=ServerConfig(host=host))
    with caplog.at_level(logging.WARNING, logger="dsrouter"):
        _warn_if_exposed(config, Auth(SecurityConfig(admin_token=token), TenantsConfig()))
    return any("NO admin token" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.2", "127.255.0.9", "::1", "::ffff:127.0.0.1", "localhost", "LOCALHOST"],
)
def test_loopback_hosts_do_not_warn(caplog: pytest.LogCaptureFixture, host: str) -> None:
    assert not _warned(caplog, host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "fe80::1", "router.internal", "128.0.0.1"]
)
def test_other_hosts_warn_without_an_admin_token(
    caplog: pytest.LogCaptureFixture, host: str
) -> None:
    assert _warned(caplog, host)


def test_an_admin_token_silences_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert not _warned(caplog, "0.0.0.0", token="s3cret")
