"""The `[tracing]` section: checked like the rest of the file, and by `check-config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsrouter import tracing
from dsrouter.cli import main
from dsrouter.config import ConfigError, load
from dsrouter.tracing import make_tracing, otlp_traces_url


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(text)
    return path


def test_every_bad_tracing_key_is_reported_with_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[tracing]\nendpoint = "collector:4318"\nprotocol = "grpc"\nsample_ratio = 1.5\n'
        "timeout_s = 0\nsampler = 1\n",
    )
    with pytest.raises(ConfigError) as error:
        load(path)
    problems = "\n".join(error.value.problems)
    for key, what in [
        ("tracing.endpoint", "expected an http(s) URL"),
        ("tracing.protocol", "expected one of 'http/protobuf'"),
        ("tracing.sample_ratio", "expected a number 0..1, got 1.5"),
        ("tracing.timeout_s", "expected a number > 0"),
        ("tracing.sampler", "unknown key"),
    ]:
        assert f"{path}: {key}: {what}" in problems


def test_check_config_shows_the_section_with_header_values_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[tracing]\nendpoint = "http://tempo:4318/"\nsample_ratio = 0.25\n'
        'headers = { "Authorization" = "Basic c2VjcmV0", "x-scope-orgid" = "team-a" }\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    section = json.loads(capsys.readouterr().out)["tracing"]
    assert section["endpoint"] == "http://tempo:4318"
    assert section["sample_ratio"] == 0.25
    assert section["headers"] == {"Authorization": "***", "x-scope-orgid": "***"}


def test_check_config_refuses_an_endpoint_without_the_tracing_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "available", lambda: False)
    path = write(tmp_path, '[tracing]\nendpoint = "http://127.0.0.1:4318"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: tracing.endpoint:" in err and "dsrouter[tracing]" in err


def test_tracing_is_off_without_an_endpoint() -> None:
    off = make_tracing(load(None).config.tracing)
    assert off.enabled is False
    with off.span("anything") as span:
        assert off.headers(span) == []


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("https://otlp.example/", "https://otlp.example/v1/traces"),
        ("http://gateway/otlp/v1/traces", "http://gateway/otlp/v1/traces"),
    ],
)
def test_spans_go_to_v1_traces_under_a_bare_endpoint(endpoint: str, url: str) -> None:
    assert otlp_traces_url(endpoint) == url
