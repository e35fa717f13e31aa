"""Property tests: no input makes the config loader fail with anything but ConfigError."""

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsrouter.config import MASK, Config, ConfigError, dump_config, structure_config

SECTIONS = [
    "server",
    "timeouts",
    "routing",
    "cost",
    "health",
    "launcher",
    "security",
    "logging",
    "workers",
    "bogus",
]
KEYS = [
    "host",
    "port",
    "interval_s",
    "algorithm",
    "num_workers",
    "url",
    "level",
    "command",
    "max_attempts",
    "gpu_ids",
    "env",
    "models",
    "api_keys",
    "timeout_s",
    "x",
    "extra_args",
    "port_stride",
    "allowed_worker_networks",
    "steps",
    "width",
    "m",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)
documents = st.dictionaries(
    st.sampled_from(SECTIONS),
    st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=5)),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(documents)
def test_any_document_is_a_config_or_a_list_of_named_problems(raw: dict) -> None:
    try:
        config = structure_config(raw, "fuzz.toml")
    except ConfigError as exc:
        assert exc.problems
        assert all(problem.startswith("fuzz.toml: ") for problem in exc.problems)
    else:
        assert isinstance(config, Config)


LIST_FIELDS = [
    ("security", "api_keys"),
    ("security", "allowed_worker_networks"),
    ("launcher", "gpu_ids"),
    ("launcher", "command"),
    ("workers", None),
]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(LIST_FIELDS), st.text(max_size=20))
def test_a_string_is_never_taken_for_a_list_of_its_characters(
    field: tuple[str, str | None], text: str
) -> None:
    section, key = field
    raw = {section: text} if key is None else {section: {key: text}}
    with pytest.raises(ConfigError) as info:
        structure_config(raw, "fuzz.toml")
    path = section if key is None else f"{section}.{key}"
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"fuzz.toml: {path}: expected a list of ")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_extra_args_as_a_string_is_split_like_a_shell_or_named_as_the_problem(text: str) -> None:
    try:
        expected = shlex.split(text)
    except ValueError:
        with pytest.raises(ConfigError) as info:
            structure_config({"launcher": {"extra_args": text}}, "fuzz.toml")
        assert info.value.problems[0].startswith("fuzz.toml: launcher.extra_args: expected")
    else:
        config = structure_config({"launcher": {"extra_args": text}}, "fuzz.toml")
        assert config.launcher.extra_args == expected


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20), st.lists(st.text(min_size=1, max_size=8), max_size=3))
def test_dumped_config_never_shows_a_secret(token: str, keys: list[str]) -> None:
    config = structure_config(
        {
            "security": {"admin_token": token, "api_keys": keys, "worker_api_key": token},
            "workers": [{"url": "http://127.0.0.1:35001", "api_key": token}],
        },
        "fuzz.toml",
    )
    dumped = dump_config(config)
    assert dumped["security"]["admin_token"] == dumped["security"]["worker_api_key"] == MASK
    assert dumped["security"]["api_keys"] == [MASK] * len(keys)
    assert dumped["workers"][0]["api_key"] == MASK
