"""Property tests: no input makes the config loader fail with anything but ConfigError."""

from hypothesis import given, settings
from hypothesis import strategies as st

from dsrouter.config import Config, ConfigError, structure_config

SECTIONS = ["server", "timeouts", "routing", "cost", "health", "launcher", "security",
            "logging", "workers", "bogus"]
KEYS = ["host", "port", "interval_s", "algorithm", "num_workers", "url", "level", "command",
        "max_attempts", "gpu_ids", "env", "models", "api_keys", "timeout_s", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12)
documents = st.dictionaries(st.sampled_from(SECTIONS), st.one_of(
    values, st.dictionaries(st.sampled_from(KEYS), values, max_size=5)), max_size=6)


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
