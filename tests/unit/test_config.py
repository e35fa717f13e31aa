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
    path = write(tmp_path, """
[health]
interval_s = "ten"
failure_treshold = 3
[routing]
algorithm = "fastest"
[server]
port = 70000
[[workers]]
url = "http://169.254.169.254"
""")
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
    yaml_path = write(tmp_path, """
launcher:
  backend: local
  model: Qwen/Qwen-Image
  num_workers: 8
  num_gpus_per_worker: 1
  worker_base_port: 10090
  wait_timeout: 600
  worker_gpu_ids: ["0", "1,2", 3]
  worker_extra_args: "--dit-precision bf16 --warmup-mode off"
""", "launcher.yaml")
    config = load_config(None, Overrides(launcher_config=yaml_path))
    launcher = config.launcher
    assert (launcher.model, launcher.num_workers, launcher.wait_timeout_s) == (
        "Qwen/Qwen-Image", 8, 600.0)
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
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[health]\ninterval_s = 0\n[logging]\nlevel = 'loud'\n")
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith(f"config error: {path}: ") for line in err)


def test_check_config_prints_the_effective_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
        for field in attrs.fields(section.type if isinstance(section.type, type) else
                                  type(getattr(Config(), section.name))):
            assert f"\n{field.name} = " in text, f"{section.name}.{field.name} undocumented"
