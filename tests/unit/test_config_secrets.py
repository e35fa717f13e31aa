"""Secret sources, masked command lines and the reload guard (issue 12, items 3, 6, 9).

A configured `admin_token_env` / `admin_token_file` / `api_keys_file` that delivers nothing
used to mean "no auth" without a word; now it is a config error at load time, which start-up,
`check-config` and reload all go through.
"""

import json
from pathlib import Path

import pytest

from dsrouter.cli import main
from dsrouter.config import (
    MASK,
    ApiKey,
    Config,
    ConfigError,
    LauncherConfig,
    LoadedConfig,
    SecurityConfig,
    StaticWorker,
    load,
    load_config,
    mask_argv,
)
from dsrouter.reload import security_changes


def write(tmp_path: Path, text: str, name: str = "router.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def security(tmp_path: Path, body: str) -> Path:
    return write(tmp_path, "[security]\n" + body)


@pytest.mark.parametrize(
    ("value", "says"), [(None, "is not set"), ("", "is empty"), ("  \n", "is empty")]
)
def test_an_admin_token_variable_that_is_unset_or_empty_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, says: str
) -> None:
    if value is None:
        monkeypatch.delenv("DSROUTER_TEST_TOKEN", raising=False)
    else:
        monkeypatch.setenv("DSROUTER_TEST_TOKEN", value)
    path = security(tmp_path, 'admin_token_env = "DSROUTER_TEST_TOKEN"\n')
    assert problems_of(path) == [
        f"{path}: security.admin_token_env: environment variable 'DSROUTER_TEST_TOKEN' {says}"
    ]


def test_check_config_exits_2_on_an_unset_token_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("UNSET_VAR", raising=False)
    path = security(tmp_path, 'admin_token_env = "UNSET_VAR"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"config error: {path}: security.admin_token_env: environment variable "
        "'UNSET_VAR' is not set"
    )


@pytest.mark.parametrize(
    ("key", "content", "says"),
    [
        ("admin_token_file", None, "cannot read"),
        ("admin_token_file", "", "the first line of"),
        ("admin_token_file", "\ntoken-on-line-two\n", "the first line of"),
        ("admin_token_file", b"\xff\xfe\n", "is not UTF-8 text"),
        ("api_keys_file", None, "cannot read"),
        ("api_keys_file", "", "holds no key"),
        ("api_keys_file", "# keys\n\n   # indented comment\n\t#tab\n", "holds no key"),
    ],
)
def test_a_secret_file_that_is_missing_empty_or_unreadable_is_a_config_error(
    tmp_path: Path, key: str, content: str | bytes | None, says: str
) -> None:
    secret = tmp_path / "secret"
    if isinstance(content, bytes):
        secret.write_bytes(content)
    elif content is not None:
        secret.write_text(content)
    path = security(tmp_path, f'{key} = "{secret}"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: security.{key}: ") and says in problem


def test_a_directory_as_token_file_is_a_config_error(tmp_path: Path) -> None:
    path = security(tmp_path, f'admin_token_file = "{tmp_path}"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: security.admin_token_file: cannot read")


def test_every_broken_source_is_reported_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UNSET_VAR", raising=False)
    path = security(
        tmp_path,
        'admin_token_env = "UNSET_VAR"\n'
        f'admin_token_file = "{tmp_path / "absent"}"\n'
        f'api_keys_file = "{tmp_path / "absent"}"\n',
    )
    keys = [problem.split(": ")[1] for problem in problems_of(path)]
    assert keys == [
        "security.admin_token_env",
        "security.admin_token_file",
        "security.api_keys_file",
    ]


def test_the_token_file_gives_its_first_line_and_wins_over_variable_and_literal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = write(tmp_path, "  from-file  \nsecond line\n", name="token")
    monkeypatch.setenv("DSROUTER_TEST_TOKEN", " from-env\n")
    path = security(
        tmp_path,
        f'admin_token = "literal"\nadmin_token_env = "DSROUTER_TEST_TOKEN"\n'
        f'admin_token_file = "{token}"\n',
    )
    assert load_config(path).security.admin_token == "from-file"
    path = security(tmp_path, 'admin_token = "literal"\nadmin_token_env = "DSROUTER_TEST_TOKEN"\n')
    assert load_config(path).security.admin_token == "from-env"


def test_api_keys_file_skips_blank_lines_and_comments_even_indented(tmp_path: Path) -> None:
    keys = write(
        tmp_path,
        "# team keys\nkey-one\n\n   # retired: old-key\n\t#tab-comment\n  key-two  \n",
        "k",
    )
    path = security(tmp_path, f'api_keys = ["listed"]\napi_keys_file = "{keys}"\n')
    assert load_config(path).security.api_keys == ["listed", "key-one", "key-two"]


def test_a_config_without_secret_sources_reads_nothing(tmp_path: Path) -> None:
    path = security(tmp_path, 'admin_token = "t"\napi_keys = ["k", ""]\n')
    assert load_config(path).security == SecurityConfig(admin_token="t", api_keys=["k"])


@pytest.mark.parametrize(
    ("argv", "masked"),
    [
        (["--api-key", "sk-1", "--port", "1"], ["--api-key", MASK, "--port", "1"]),
        (["--api-key=sk-1"], [f"--api-key={MASK}"]),
        (
            ["--hf-token", "hf_x", "--admin-api-key=y"],
            ["--hf-token", MASK, f"--admin-api-key={MASK}"],
        ),
        (["--ssl-keyfile-password", "pw"], ["--ssl-keyfile-password", MASK]),
        (
            ["env", "HF_TOKEN=hf_x", "sglang", "serve"],
            ["env", f"HF_TOKEN={MASK}", "sglang", "serve"],
        ),
        (["--use-api-key", "--port", "1"], ["--use-api-key", "--port", "1"]),
        (
            ["--max-tokens", "512", "--tokenizer-path", "/t"],
            ["--max-tokens", "512", "--tokenizer-path", "/t"],
        ),
        (
            ["--model-path=/models/monkey", "--api-key"],
            ["--model-path=/models/monkey", "--api-key"],
        ),
    ],
)
def test_secret_flags_in_a_command_line_are_masked(argv: list[str], masked: list[str]) -> None:
    assert mask_argv(argv) == masked


def test_check_config_masks_secrets_in_extra_args_and_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[launcher]\nextra_args = "--api-key sk-PLAIN-1 --dit-precision bf16"\n'
        'command = ["env", "HF_TOKEN=hf_PLAIN_2", "sglang", "serve", "--api-key=sk-PLAIN-3"]\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PLAIN" not in out
    launcher = json.loads(out)["launcher"]
    assert launcher["extra_args"] == ["--api-key", MASK, "--dit-precision", "bf16"]
    assert launcher["command"] == [
        "env",
        f"HF_TOKEN={MASK}",
        "sglang",
        "serve",
        f"--api-key={MASK}",
    ]
    assert load_config(path).launcher.extra_args[1] == "sk-PLAIN-1", "only the printout is masked"


# ---- the reload guard ----------------------------------------------------------------------

GUARDED = Config(
    workers=[StaticWorker("http://127.0.0.1:1")],
    security=SecurityConfig(admin_token="t", api_keys=["k"]),
)


def changes(tmp_path: Path, text: str, old: Config = GUARDED) -> tuple[list[str], list[str]]:
    return security_changes(old, load(write(tmp_path, text)))


@pytest.mark.parametrize("text", ["", "# router.toml\n", "[health]\ninterval_s = 2\n"])
def test_a_file_cut_short_may_not_drop_token_keys_or_workers(tmp_path: Path, text: str) -> None:
    refused, _ = changes(tmp_path, text)
    path = tmp_path / "router.toml"
    assert [line.split(": ", 2)[:2] for line in refused] == [
        [str(path), "security.admin_token"],
        [str(path), "security.api_keys"],
        [str(path), "workers"],
    ]
    assert 'write admin_token = "" under [security]' in refused[0]
    assert "write workers = [] (above the first table)" in refused[2]


def test_explicit_empty_values_remove_them_and_say_it_weakens_security(tmp_path: Path) -> None:
    refused, weakened = changes(
        tmp_path, 'workers = []\n[security]\nadmin_token = ""\napi_keys = []\n'
    )
    assert refused == []
    assert [line.split(":")[0] for line in weakened] == [
        "security.admin_token",
        "security.api_keys",
    ]


def test_replacing_secrets_or_workers_is_no_weakening(tmp_path: Path) -> None:
    refused, weakened = changes(
        tmp_path,
        '[[workers]]\nurl = "http://127.0.0.1:2"\n[security]\nadmin_token = "new"\n'
        'api_keys = ["new"]\n',
    )
    assert (refused, weakened) == ([], [])


def test_loosened_security_settings_are_reported(tmp_path: Path) -> None:
    old = Config(
        security=SecurityConfig(protect_metrics=True, allowed_worker_networks=["10.0.0.0/8"])
    )
    _, weakened = changes(
        tmp_path,
        "[security]\nforward_authorization = true\nprotect_metrics = false\n"
        'allowed_worker_networks = ["10.0.0.0/8", "0.0.0.0/0"]\n',
        old,
    )
    assert [line.split(":")[0] for line in weakened] == [
        "security.forward_authorization",
        "security.protect_metrics",
        "security.allowed_worker_networks",
    ]
    assert "0.0.0.0/0" in weakened[2]
    _, weakened = changes(tmp_path, "", old)
    assert [line.split(":")[0] for line in weakened] == [
        "security.protect_metrics",
        "security.allowed_worker_networks",
    ]


def test_a_router_without_auth_or_workers_reloads_anything(tmp_path: Path) -> None:
    assert changes(tmp_path, "", Config()) == ([], [])


def test_flags_count_as_explicit(tmp_path: Path) -> None:
    from dsrouter.config import Overrides

    loaded = load(write(tmp_path, ""), Overrides(worker_urls=[]))
    assert "workers" in loaded.given
    refused, _ = security_changes(Config(workers=GUARDED.workers), loaded)
    assert refused == []
    assert isinstance(loaded, LoadedConfig) and loaded.config.launcher == LauncherConfig()


def test_a_file_cut_short_may_not_drop_the_tenant_keys(tmp_path: Path) -> None:
    old = Config(security=SecurityConfig(keys=[ApiKey("a", key="k")]))
    refused, _ = changes(tmp_path, "", old)
    assert [line.split(": ", 2)[1] for line in refused] == ["security.keys"]
    assert "inference is open to anyone" in refused[0]
    refused, weakened = changes(tmp_path, "[security]\nkeys = []\n", old)
    assert refused == []
    assert [line.split(":")[0] for line in weakened] == ["security.keys"]
