from pathlib import Path

import pytest

from dsrouter.cli import main
from dsrouter.config import Config, ConfigError, Overrides, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "router.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_config_loads_and_matches_defaults() -> None:
    config = load_config(REPO / "router.toml.example")
    assert isinstance(config, Config)
    assert config.server.port == 30080
    assert config.routing.algorithm == "least-work"


def test_every_problem_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[health]
interval_s = "ten"
failure_treshold = 3
[routing]
algorithm = "fastest"
[server]
port = 70000
[[workers]]
url = "http://169.254.169.254"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 5
    assert all(p.startswith(f"{path}: ") for p in problems)
    text = "\n".join(problems)
    assert "health.interval_s: expected a number > 0, got 'ten'" in text
    assert "health.failure_treshold: unknown key" in text
    assert "routing.algorithm: expected one of 'least-work', 'least-request'" in text
    assert "server.port: expected a port number" in text
    assert "workers[0].url: expected a worker URL" in text and "blocked" in text


def test_flags_override_the_file_and_errors_name_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n[health]\ninterval_s = 3\n")
    config = load_config(path, Overrides(port=30081, worker_urls=["http://A:1/", "http://b:2"]))
    assert config.server.port == 30081
    assert config.health.interval_s == 3.0
    assert [w.url for w in config.workers] == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError) as info:
        load_config(path, Overrides(health_check_interval=-1))
    assert info.value.problems == ["--health-check-interval: expected a number > 0, got -1"]


def test_flags_only_without_a_file() -> None:
    config = load_config(None, Overrides(routing_algorithm="round-robin"))
    assert config.routing.algorithm == "round-robin"


def test_bools_are_not_numbers_and_numbers_are_not_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nhost = 5\nmax_connections = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert sorted(info.value.problems) == [
        f"{path}: server.host: expected a string, got 5",
        f"{path}: server.max_connections: expected an integer > 0, got True",
    ]


def test_invalid_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_seed_launcher_yaml_is_accepted(tmp_path: Path) -> None:
    yaml_path = write(
        tmp_path,
        """
launcher:
  backend: local
  model: Qwen/Qwen-Image
  num_workers: 8
  num_gpus_per_worker: 1
  worker_base_port: 10090
  wait_timeout: 600
  worker_gpu_ids: ["0", "1,2", 3]
  worker_extra_args: "--dit-precision bf16 --warmup-mode off"
""",
        "launcher.yaml",
    )
    config = load_config(None, Overrides(launcher_config=yaml_path))
    launcher = config.launcher
    assert (launcher.model, launcher.num_workers, launcher.wait_timeout_s) == (
        "Qwen/Qwen-Image",
        8,
        600.0,
    )
    assert launcher.gpu_ids == [["0"], ["1", "2"], ["3"]]
    assert launcher.extra_args == ["--dit-precision", "bf16", "--warmup-mode", "off"]


def test_yaml_errors_name_the_yaml_file(tmp_path: Path) -> None:
    yaml_path = write(tmp_path, "launcher:\n  num_workers: lots\n  colour: red\n", "l.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(None, Overrides(launcher_config=yaml_path))
    assert sorted(info.value.problems) == [
        f"{yaml_path}: launcher.colour: unknown key",
        f"{yaml_path}: launcher.num_workers: expected an integer >= 0, got 'lots'",
    ]


def test_check_config_exits_2_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[health]\ninterval_s = 0\n[logging]\nlevel = 'loud'\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith(f"config error: {path}: ") for line in err)


def test_check_config_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[health]\ninterval_s = 2.5\n")
    assert main(["check-config", "--config", str(path), "--port", "9999"]) == 0
    out = capsys.readouterr().out
    assert '"interval_s": 2.5' in out and '"port": 9999' in out


def test_example_documents_every_key() -> None:
    import attrs

    text = (REPO / "router.toml.example").read_text()
    example = load_config(REPO / "router.toml.example")
    assert example == Config()
    for section in attrs.fields(Config):
        if section.name == "workers":
            assert "[[workers]]" in text
            continue
        assert f"[{section.name}]" in text
        for field in attrs.fields(
            section.type
            if isinstance(section.type, type)
            else type(getattr(Config(), section.name))
        ):
            assert f"\n{field.name} = " in text, f"{section.name}.{field.name} undocumented"


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[security]\napi_keys = "abc"',
            "security.api_keys: expected a list of strings, got 'abc'",
        ),
        (
            '[security]\nallowed_worker_networks = "10.0.0.0/8"',
            "security.allowed_worker_networks: expected a list of CIDRs or host names",
        ),
        (
            '[launcher]\ncommand = "sglang serve"',
            "launcher.command: expected a list of strings, got 'sglang serve'",
        ),
        ('[launcher]\ngpu_ids = "01"', "launcher.gpu_ids: expected a list of GPU id lists"),
        ('workers = "http://127.0.0.1:1"', "workers: expected a list of tables"),
    ],
)
def test_a_string_where_a_list_is_expected_is_an_error(
    tmp_path: Path, text: str, problem: str
) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'router.toml'}: {problem}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("server = 5", "server: expected a table, got 5"),
        ("[cost]\nmodels = 5", "cost.models: expected a table of model names to tables, got 5"),
        ("[cost]\nmodels = { m = 5 }", "cost.models['m']: expected a table, got 5"),
        ('[launcher]\nenv = "A=1"', "launcher.env: expected a table of strings, got 'A=1'"),
        ("workers = [5]", "workers[0]: expected a table, got 5"),
    ],
)
def test_a_value_of_the_wrong_shape_says_what_was_expected(
    tmp_path: Path, text: str, problem: str
) -> None:
    assert problems_of(tmp_path, text) == [f"{tmp_path / 'router.toml'}: {problem}"]


def test_extra_args_as_a_shell_string_is_split_in_toml_as_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "[launcher]\nextra_args = \"x  y --name 'a b'\"\n")
    assert load_config(path).launcher.extra_args == ["x", "y", "--name", "a b"]
    path = write(tmp_path, '[launcher]\nextra_args = ["x y"]\n')
    assert load_config(path).launcher.extra_args == ["x y"]
    yaml_path = write(tmp_path, 'launcher:\n  worker_extra_args: "x  y"\n', "l.yaml")
    assert load_config(None, Overrides(launcher_config=yaml_path)).launcher.extra_args == ["x", "y"]
    assert problems_of(tmp_path, "[launcher]\nextra_args = 'x \"y'") == [
        f"{tmp_path / 'router.toml'}: launcher.extra_args: expected a shell string "
        "(No closing quotation), got 'x \"y'"
    ]


def test_gpu_ids_take_the_yaml_forms_and_reject_empty_or_malformed_groups(tmp_path: Path) -> None:
    path = write(tmp_path, '[launcher]\ngpu_ids = [["0"], "1, 2", 3, ["GPU-8932f937"], [4]]\n')
    assert load_config(path).launcher.gpu_ids == [["0"], ["1", "2"], ["3"], ["GPU-8932f937"], ["4"]]
    problems = problems_of(tmp_path, '[launcher]\ngpu_ids = ["10", "", [], ["0,1"], -1, true]')
    assert [p.split(": ")[1] for p in problems] == [
        "launcher.gpu_ids[1]",
        "launcher.gpu_ids[2]",
        "launcher.gpu_ids[3]",
        "launcher.gpu_ids[4]",
        "launcher.gpu_ids[5]",
    ]
    assert all("expected the GPU ids of one worker" in p for p in problems)


def test_port_stride_below_two_and_an_empty_command_are_rejected(tmp_path: Path) -> None:
    source = tmp_path / "router.toml"
    assert sorted(problems_of(tmp_path, "[launcher]\nport_stride = 1\ncommand = []\n")) == [
        f"{source}: launcher.command: expected a non-empty list of strings (the program, then "
        "its arguments), got []",
        f"{source}: launcher.port_stride: expected an integer >= 2, got 1",
    ]
    assert problems_of(tmp_path, '[launcher]\ncommand = ["", "serve"]\n')[0].startswith(
        f"{source}: launcher.command: expected a non-empty list"
    )
    path = write(tmp_path, '[launcher]\nport_stride = 3\ncommand = ["python", "-m", "w"]\n')
    launcher = load_config(path).launcher
    assert (launcher.port_stride, launcher.command) == (3, ["python", "-m", "w"])


def test_allowed_worker_networks_take_cidrs_and_names_but_not_broken_cidrs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[security]\nallowed_worker_networks = "
        '["10.0.0.0/8", "fd00::/8", "::1", "gpu-3.cluster.local"]\n',
    )
    assert len(load_config(path).security.allowed_worker_networks) == 4
    problems = problems_of(
        tmp_path, '[security]\nallowed_worker_networks = ["10.0.0.0/33", "a b", ""]\n'
    )
    assert [p.split(": ")[1] for p in problems] == [
        f"security.allowed_worker_networks[{i}]" for i in range(3)
    ]
    assert all("expected a CIDR like '10.0.0.0/8' or a host name" in p for p in problems)


def test_model_overrides_are_checked_and_reach_the_cost_model(tmp_path: Path) -> None:
    from dsrouter.cost import CostModel

    source = tmp_path / "router.toml"
    assert sorted(problems_of(tmp_path, "[cost]\nmodels = { m = { steps = -1, foo = 2 } }")) == [
        f"{source}: cost.models['m'].foo: unknown key",
        f"{source}: cost.models['m'].steps: expected an integer > 0, got -1",
    ]
    path = write(
        tmp_path,
        '[cost]\ndefault_steps = 20\nmodels = { "org/m" = { steps = 50, width = 2000 } }\n',
    )
    model = CostModel(load_config(path).cost)
    tuned = model.estimate("/v1/images/generations", b'{"model": "org/m"}', "application/json")
    assert tuned == pytest.approx(2000 * 1024 / 1e6 * 50)
    other = model.estimate("/v1/images/generations", b'{"model": "x"}', "application/json")
    assert other == pytest.approx(1024 * 1024 / 1e6 * 20)


def test_check_config_masks_secrets_but_shows_where_they_come_from(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    monkeypatch.setenv("DSROUTER_ADMIN_TOKEN", "env-secret")
    keys = write(tmp_path_factory.mktemp("keys"), "file-secret\n", name="keys")
    path = write(
        tmp_path,
        """
[[workers]]
url = "http://127.0.0.1:35001"
api_key = "worker-one-secret"
[[workers]]
url = "http://127.0.0.1:35002"
[launcher]
env = { HF_TOKEN = "hf-secret", CUDA_HOME = "/usr/local/cuda" }
[security]
admin_token = "admin-secret"
admin_token_env = "DSROUTER_ADMIN_TOKEN"
api_keys = ["key-secret-1", "key-secret-2"]
api_keys_file = "KEYS"
worker_api_key = "pool-secret"
""".replace("KEYS", str(keys)),
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "secret" not in out
    printed = json.loads(out)
    security = printed["security"]
    assert (security["admin_token"], security["api_keys"], security["worker_api_key"]) == (
        "***",
        ["***", "***", "***"],
        "***",
    )
    assert security["admin_token_env"] == "DSROUTER_ADMIN_TOKEN"
    assert security["api_keys_file"] == str(keys)
    assert security["admin_token_file"] == ""
    assert [w["api_key"] for w in printed["workers"]] == ["***", ""]
    assert printed["launcher"]["env"] == {"HF_TOKEN": "***", "CUDA_HOME": "/usr/local/cuda"}
    config = load_config(path)
    assert config.security.admin_token == "env-secret", "only the printout is masked"


def test_launcher_yaml_defaults_to_one_worker_and_takes_log_prefix(tmp_path: Path) -> None:
    """sglang-d-router's minimal YAML names no `num_workers` (its default is 1) and may set
    `log_prefix`; a router.toml without `[launcher]` still launches nothing."""
    yaml_path = write(
        tmp_path, "launcher:\n  model: Qwen/Qwen-Image\n  log_prefix: '[w]'\n", "l.yaml"
    )
    launcher = load_config(None, Overrides(launcher_config=yaml_path)).launcher
    assert (launcher.num_workers, launcher.log_prefix) == (1, "[w]")
    assert load_config(None).launcher.num_workers == 0


def test_the_ray_backend_reads_its_table_in_either_toml_form(tmp_path: Path) -> None:
    inline = load_config(
        write(
            tmp_path,
            '[launcher]\nbackend = "ray"\nray = { address = "auto", namespace = "pool-a" }\n',
        )
    )
    table = load_config(
        write(
            tmp_path,
            '[launcher]\nbackend = "ray"\n\n[launcher.ray]\naddress = "auto"\n'
            'namespace = "pool-a"\n',
            name="table.toml",
        )
    )
    assert inline == table
    assert inline.launcher.backend == "ray"
    assert (inline.launcher.ray.address, inline.launcher.ray.detach) == ("auto", False)


def test_a_misspelt_ray_key_names_its_path(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[launcher.ray]\ndetach = "yes"\nadress = "auto"\n')
    assert any("launcher.ray.detach" in problem for problem in problems), problems
    assert any("launcher.ray.adress" in problem for problem in problems), problems
