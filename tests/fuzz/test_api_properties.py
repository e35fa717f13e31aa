"""Property tests against a real router process: no input to the management, discovery or
RL routes makes the router itself answer 500, and its own errors are JSON."""

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PATHS = ["/workers", "/workers/{id}", "/add_worker", "/list_workers", "/health_workers",
         "/health", "/v1/models", "/update_weights_from_disk", "/release_memory_occupation",
         "/resume_memory_occupation", "/get_weights_checksum", "/v1/set_lora", "/metrics",
         "/openapi.json"]
METHODS = ["GET", "POST", "PUT", "DELETE"]
ids = st.one_of(st.text(max_size=30), st.sampled_from([
    "http%3A%2F%2F127.0.0.1%3A1", "%FF", "%", "http://x:1", "..%2F", "%00"]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["url", "worker_url", "is_dead", "refresh_video_support",
                                 "draining", "model_path", "x"]), inner, max_size=4)),
    max_leaves=8)
bodies = st.one_of(st.none(), st.binary(max_size=200), json_values.map(
    lambda v: __import__("json").dumps(v).encode()))
queries = st.dictionaries(st.sampled_from(["url", "worker_url", "limit", "x"]),
                          st.text(max_size=40), max_size=2)


@pytest.fixture(scope="module")
def router() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dsrouter", "run", "--host", "127.0.0.1", "--port", "0",
         "--worker-urls", "http://127.0.0.1:9", "--log-level", "error"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "dsrouter listening on" in line, line
        yield line.split("dsrouter listening on ", 1)[1].strip()
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0
        if process.stdout is not None:
            process.stdout.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), path=st.sampled_from(PATHS), worker_id=ids,
       body=bodies, params=queries)
def test_no_input_makes_the_router_fail(router: str, method: str, path: str, worker_id: str,
                                        body: bytes | None, params: dict) -> None:
    url = router + path.replace("{id}", worker_id.replace("/", "%2F").replace("?", "%3F")
                                .replace("#", "%23"))
    try:
        response = httpx.request(method, url, content=body, params=params, timeout=10,
                                 headers={"content-type": "application/json"})
    except httpx.InvalidURL:
        return
    assert response.status_code != 500, (method, url, body, response.text[:200])
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith(
            "application/json"):
        assert {"error", "detail", "status"} & set(response.json())
