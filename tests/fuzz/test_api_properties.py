"""Property tests against a real router process: no input to any route the OpenAPI document
lists makes the router itself answer 500, and its own errors are JSON. Also: the document
lists every route the router serves, so the fuzzer (which draws its paths from it) cannot
miss a new one."""

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsrouter import routes
from dsrouter.app import create_app
from dsrouter.config import Config
from dsrouter.openapi import build_openapi

DOCUMENT = build_openapi()
PATHS = sorted(DOCUMENT["paths"])
METHODS = ["GET", "POST", "PUT", "DELETE"]
_PARAM = re.compile(r"\{[^}]+\}")
ids = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["http%3A%2F%2F127.0.0.1%3A1", "%FF", "%", "http://x:1", "..%2F", "%00"]),
)
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "url",
                    "worker_url",
                    "is_dead",
                    "refresh_video_support",
                    "draining",
                    "model_path",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=8,
)
bodies = st.one_of(
    st.none(), st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())
)
queries = st.dictionaries(
    st.sampled_from(["url", "worker_url", "limit", "x"]), st.text(max_size=40), max_size=2
)


@pytest.fixture(scope="module")
def router() -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsrouter",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--worker-urls",
            "http://127.0.0.1:9",
            "--log-level",
            "error",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
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


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(PATHS),
    worker_id=ids,
    body=bodies,
    params=queries,
)
def test_no_input_makes_the_router_fail(
    router: str, method: str, path: str, worker_id: str, body: bytes | None, params: dict
) -> None:
    segment = worker_id.replace("/", "%2F").replace("?", "%3F").replace("#", "%23")
    url = router + _PARAM.sub(lambda _: segment, path)
    try:
        response = httpx.request(
            method,
            url,
            content=body,
            params=params,
            timeout=10,
            headers={"content-type": "application/json"},
        )
    except httpx.InvalidURL:
        return
    assert response.status_code != 500, (method, url, body, response.text[:200])
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        assert {"error", "detail", "status"} & set(response.json())


def _quart_rules() -> list[tuple[str, str]]:
    """(OpenAPI path, method) of every rule Quart serves; `create_app` reads only `config`."""
    app = create_app(SimpleNamespace(config=Config()), None)  # type: ignore[arg-type]
    found = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?_?([a-z_]+)>", r"{\1}", rule.rule)
        found += [
            (path, method.lower())
            for method in rule.methods or ()
            if method not in ("HEAD", "OPTIONS")
        ]
    return sorted(found)


def test_every_quart_route_is_in_the_openapi_document() -> None:
    rules = _quart_rules()
    assert len(rules) >= 20, rules  # the app really was built with its blueprints
    missing = [
        (path, method) for path, method in rules if method not in DOCUMENT["paths"].get(path, {})
    ]
    assert missing == []


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    ]


def test_every_documented_path_parameter_is_declared() -> None:
    for path, item in DOCUMENT["paths"].items():
        declared = {p["name"] for p in item.get("parameters", [])}
        assert set(re.findall(r"\{([^}]+)\}", path)) == declared, path


def test_proxied_operations_are_routed_as_documented_and_cover_the_routing_table() -> None:
    """`x-dsrouter-routing` says which `routes.classify` kind a proxied operation gets; every
    path the routing table names (generations, aliases, job routes) is documented."""
    quart = set(_quart_rules())
    proxied = [
        (path, method, op["x-dsrouter-routing"])
        for path, method, op in _operations()
        if "x-dsrouter-routing" in op
    ]
    assert not {(path, method) for path, method, _ in proxied} & quart
    for path, method, kind in proxied:
        concrete = _PARAM.sub("abc", path)
        assert routes.classify(method.upper(), concrete, b"").kind == kind, (method, path)
    documented = {path for path, _, _ in proxied}
    named = {
        *routes.SYNCHRONOUS_GENERATIONS,
        "/generate",
        "/generate_video",
        "/v1/videos",
        "/v1/meshes",
        "/v1/videos/{video_id}",
        "/v1/videos/{video_id}/content",
        "/v1/meshes/{mesh_id}",
        "/v1/meshes/{mesh_id}/content",
        "/v1/images/{image_id}/content",
    }
    assert named - documented == set()


def test_the_router_serves_this_document(router: str) -> None:
    served = httpx.get(f"{router}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(DOCUMENT))


@pytest.mark.parametrize(
    "path", ["/v1/images/%00/content", "/v1/videos/%00", "/v1/meshes/%01/content"]
)
def test_a_job_id_with_a_control_character_is_unknown_not_a_crash(router: str, path: str) -> None:
    response = httpx.get(router + path, timeout=10)
    assert response.status_code == 404 and "error" in response.json()
