"""Tracing end to end: an in-process router with an in-memory span exporter in front of real
simulated workers (spans, their links and attributes, the `traceparent` each worker got),
a router process exporting to an OTLP/HTTP receiver on 127.0.0.1, and a router with
tracing off that passes the client's headers through and never imports OpenTelemetry."""

from __future__ import annotations

import functools
import gzip
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import httpx
import pytest
import trio

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from dsrouter.embed import open_router
from tests.integration.test_proxy import healthy
from tests.support import router_process, start_simworker, wait_until

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
IMAGE = {"prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json"}
IMAGE_BODY = json.dumps(IMAGE).encode()


def traceparent(trace_id: str = CLIENT_TRACE, span_id: str = CLIENT_SPAN) -> str:
    return f"00-{trace_id}-{span_id}-01"


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def config_file(tmp_path: Path, workers: list[str], extra: str = "") -> Path:
    path = tmp_path / "router.toml"
    entries = "".join(f'[[workers]]\nurl = "{url}"\n' for url in workers)
    path.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0
[health]
interval_s = 0.3
timeout_s = 2.0
failure_threshold = 20
{extra}
{entries}"""
    )
    return path


async def seen_by(http: httpx.AsyncClient, worker_url: str) -> list[dict[str, str | None]]:
    """The trace headers the simulated worker received, oldest first."""
    return (await http.get(f"{worker_url}/_sim/traces")).json()["requests"]


def spans_of(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if hex_id(s.context.trace_id, 32) == trace_id]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


async def test_one_image_request_makes_a_server_a_queue_and_an_attempt_span_and_the_worker_gets_the_attempt_as_parent(  # noqa: E501
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    exporter = InMemorySpanExporter()
    async with trio.open_nursery() as nursery:
        # Slow enough that a second request waits in the queue behind the first one.
        worker = await start_simworker(nursery, "--task-type", "T2I", "--sec-per-mpx-step", "5")
        path = config_file(tmp_path, [worker.url], "[routing]\nmax_inflight_per_worker = 1\n")
        async with open_router(config_file=path, span_exporter=exporter) as router:
            await healthy(http, router.url, 1)
            other_trace = "a" * 32
            statuses: dict[str, int] = {}

            async def send(trace_id: str) -> None:
                answer = await http.post(
                    f"{router.url}/v1/images/generations",
                    content=IMAGE_BODY,
                    headers={
                        "content-type": "application/json",
                        "traceparent": traceparent(trace_id),
                        "tracestate": "vendor=1",
                    },
                )
                statuses[trace_id] = answer.status_code

            async with trio.open_nursery() as clients:
                clients.start_soon(send, other_trace)
                # The second request is sent once the first holds the worker's only slot.
                await wait_until(lambda: _in_flight(http, router.url, worker.url), timeout_s=10)
                clients.start_soon(send, CLIENT_TRACE)
            assert statuses == {other_trace: 200, CLIENT_TRACE: 200}
            received = await seen_by(http, worker.url)
        nursery.cancel_scope.cancel()

    spans = spans_of(exporter, CLIENT_TRACE)
    server = one(spans, "POST /v1/images/generations")
    queue = one(spans, "dsrouter.queue")
    attempt = one(spans, "dsrouter.attempt")
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None and hex_id(server.parent.span_id, 16) == CLIENT_SPAN
    assert server.parent.is_remote
    for child in (queue, attempt):
        assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["dsrouter.attempts"] == 1
    assert server.attributes["http.response.body.size"] > 0
    assert queue.attributes["dsrouter.queue.wait_s"] > 0
    assert queue.start_time < attempt.start_time
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes["dsrouter.worker.url"] == worker.url
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["http.request.resend_count"] == 0
    assert attempt.attributes["http.request.body.size"] == len(IMAGE_BODY)
    assert attempt.attributes["http.response.body.size"] > 0
    assert attempt.status.status_code is not StatusCode.ERROR
    # The first request found the worker free: no queue span in its trace.
    assert [s.name for s in spans_of(exporter, other_trace) if s.name == "dsrouter.queue"] == []

    generation = [r for r in received if r["traceparent"] and CLIENT_TRACE in r["traceparent"]]
    assert len(generation) == 1
    version, trace_id, parent_id, flags = generation[0]["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert parent_id == hex_id(attempt.context.span_id, 16)
    assert generation[0]["tracestate"] == "vendor=1"


async def _in_flight(http: httpx.AsyncClient, router: str, worker_url: str) -> bool:
    workers = (await http.get(f"{router}/workers")).json()["workers"]
    return any(w["url"] == worker_url and w["active_requests"] >= 1 for w in workers)


async def test_a_failed_first_attempt_and_its_retry_are_two_attempt_spans(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    exporter = InMemorySpanExporter()
    async with trio.open_nursery() as nursery:
        refusing = await start_simworker(nursery, "--task-type", "T2I", "--sec-per-mpx-step", "0")
        good = await start_simworker(nursery, "--task-type", "T2I", "--sec-per-mpx-step", "0")
        faults = await http.post(f"{refusing.url}/_sim/faults", json={"unavailable_rate": 1.0})
        assert faults.status_code == 200
        path = config_file(
            tmp_path, [refusing.url, good.url], '[routing]\nalgorithm = "round-robin"\n'
        )
        async with open_router(config_file=path, span_exporter=exporter) as router:
            await healthy(http, router.url, 2)
            # Round robin: within two requests one goes to the refusing worker first.
            retried = None
            for index in range(4):
                trace_id = hex_id(index + 1, 32)
                answer = await http.post(
                    f"{router.url}/v1/images/generations",
                    json=IMAGE,
                    headers={"traceparent": traceparent(trace_id)},
                )
                assert answer.status_code == 200
                if answer.headers["x-dsrouter-attempts"] == "2":
                    retried = trace_id
                    break
            assert retried is not None, "no request was retried"
            refused_saw = await seen_by(http, refusing.url)
            good_saw = await seen_by(http, good.url)
        nursery.cancel_scope.cancel()

    spans = spans_of(exporter, retried)
    server = one(spans, "POST /v1/images/generations")
    attempts = sorted(
        (s for s in spans if s.name == "dsrouter.attempt"), key=lambda s: s.start_time
    )
    assert [a.attributes["dsrouter.attempt"] for a in attempts] == [1, 2]
    assert [a.attributes["http.request.resend_count"] for a in attempts] == [0, 1]
    assert [a.attributes["dsrouter.worker.url"] for a in attempts] == [refusing.url, good.url]
    assert [a.attributes["http.response.status_code"] for a in attempts] == [503, 200]
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attempts[1].status.status_code is not StatusCode.ERROR
    assert all(a.parent.span_id == server.context.span_id for a in attempts)
    assert server.attributes["dsrouter.attempts"] == 2

    def parent_seen(saw: list[dict[str, str | None]]) -> list[str]:
        return [
            r["traceparent"].split("-")[2]
            for r in saw
            if r["traceparent"] and r["traceparent"].split("-")[1] == retried
        ]

    assert parent_seen(refused_saw) == [hex_id(attempts[0].context.span_id, 16)]
    assert parent_seen(good_saw) == [hex_id(attempts[1].context.span_id, 16)]


async def test_a_refit_is_a_span_with_a_broadcast_and_one_child_per_worker(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    exporter = InMemorySpanExporter()
    async with trio.open_nursery() as nursery:
        workers = [
            await start_simworker(nursery, "--task-type", "T2I", "--sec-per-mpx-step", "0")
            for _ in range(2)
        ]
        path = config_file(tmp_path, [w.url for w in workers])
        async with open_router(config_file=path, span_exporter=exporter) as router:
            await healthy(http, router.url, 2)
            refit = await http.post(
                f"{router.url}/update_weights_from_disk",
                json={"model_path": "/models/next", "weight_version": "v7"},
                headers={"traceparent": traceparent()},
            )
            assert refit.status_code == 200
            assert refit.json()["success"] is True
            saw = {w.url: await seen_by(http, w.url) for w in workers}
        nursery.cancel_scope.cancel()

    spans = spans_of(exporter, CLIENT_TRACE)
    refit_span = one(spans, "dsrouter.refit")
    assert hex_id(refit_span.parent.span_id, 16) == CLIENT_SPAN
    assert refit_span.attributes["dsrouter.refit.version"] == "v7"
    assert refit_span.attributes["dsrouter.refit.result"] == "success"
    assert refit_span.attributes["dsrouter.refit.confirmed"] == 2
    broadcast = one(spans, "dsrouter.broadcast")
    assert broadcast.parent.span_id == refit_span.context.span_id
    assert broadcast.attributes["dsrouter.control.path"] == "/update_weights_from_disk"
    calls = [s for s in spans if s.name == "dsrouter.control_call"]
    assert sorted(c.attributes["dsrouter.worker.url"] for c in calls) == sorted(saw)
    for call in calls:
        assert call.parent.span_id == broadcast.context.span_id
        assert call.kind is SpanKind.CLIENT
        assert call.attributes["http.response.status_code"] == 200
        url = call.attributes["dsrouter.worker.url"]
        refits = [r for r in saw[url] if r["path"] == "/update_weights_from_disk"]
        assert [r["traceparent"] for r in refits] == [
            f"00-{CLIENT_TRACE}-{hex_id(call.context.span_id, 16)}-01"
        ]


@attrs.define
class OtlpReceiver:
    """A collector's OTLP/HTTP trace endpoint, enough of it: decodes every export."""

    url: str = ""
    exports: list[ExportTraceServiceRequest] = attrs.Factory(list)
    headers: list[dict[str, str]] = attrs.Factory(list)
    received: trio.Event = attrs.Factory(trio.Event)

    async def serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        body = b""
        request: h11.Request | None = None
        with trio.move_on_after(10):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
        assert request is not None and request.target == b"/v1/traces"
        headers = {k.decode(): v.decode() for k, v in request.headers}
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.headers.append(headers)
        self.exports.append(ExportTraceServiceRequest.FromString(body))
        self.received.set()
        answer = ExportTraceServiceResponse().SerializeToString()
        data = connection.send(
            h11.Response(
                status_code=200,
                headers=[
                    ("content-type", "application/x-protobuf"),
                    ("content-length", str(len(answer))),
                    ("connection", "close"),
                ],
            )
        )
        data += connection.send(h11.Data(data=answer)) + connection.send(h11.EndOfMessage())
        await stream.send_all(data)
        await stream.aclose()

    def spans(self) -> list[tuple[str, object]]:
        """(service name, span) of everything exported so far."""
        found = []
        for export in self.exports:
            for resource_spans in export.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope_spans in resource_spans.scope_spans:
                    found += [(service, span) for span in scope_spans.spans]
        return found


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, receiver.serve, 0, host="127.0.0.1")
        )
        receiver.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        try:
            yield receiver
        finally:
            nursery.cancel_scope.cancel()


async def test_a_router_process_exports_its_spans_to_the_configured_otlp_endpoint(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with otlp_receiver() as receiver, trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, "--task-type", "T2I", "--sec-per-mpx-step", "0")
        tracing = (
            f'[tracing]\nendpoint = "{receiver.url}"\nservice_name = "router-under-test"\n'
            'headers = { "x-collector-key" = "k123" }\ntimeout_s = 5.0\n'
        )
        config = config_file(tmp_path, [worker.url], tracing).read_text()
        async with router_process([], config=config, tmp_path=tmp_path) as router:
            answer = await http.post(
                f"{router.url}/v1/images/generations",
                json=IMAGE,
                headers={"traceparent": traceparent()},
            )
            assert answer.status_code == 200
            # A reload cannot swap the exporter: it says so and keeps tracing as it was.
            (tmp_path / "router.toml").write_text(config.replace("timeout_s = 5.0", ""))
            reload = await http.post(f"{router.url}/admin/reload")
            assert reload.status_code == 200
            assert reload.json()["needs_restart"] == ["tracing"]
            status = await router.stop()
        assert status == 0
        nursery.cancel_scope.cancel()
    # Stopping flushes the batch: the spans are there without waiting for its timer.
    spans = receiver.spans()
    names = {span.name for service, span in spans if span.trace_id.hex() == CLIENT_TRACE}
    assert {"POST /v1/images/generations", "dsrouter.attempt"} <= names
    assert {service for service, _ in spans} == {"router-under-test"}
    assert all(h.get("x-collector-key") == "k123" for h in receiver.headers)


TRACING_OFF = """
import json, sys
import httpx
from dsrouter.embed import RouterThread

worker = sys.argv[1]
with RouterThread(host="127.0.0.1", port=0, worker_urls=[worker]) as router:
    with httpx.Client(timeout=30, trust_env=False) as http:
        for _ in range(200):
            workers = http.get(router.url + "/workers").json()["workers"]
            if workers and workers[0]["state"] == "healthy" and workers[0]["model"]:
                break
            http.get(router.url + "/livez")
        answer = http.post(
            router.url + "/v1/images/generations",
            json={"prompt": "p", "size": "64x64"},
            headers={"traceparent": sys.argv[2], "tracestate": "vendor=off"},
        )
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
print(json.dumps({"status": answer.status_code, "opentelemetry": loaded}))
"""


async def test_with_tracing_off_the_client_headers_pass_unchanged_and_opentelemetry_is_not_imported(
    http: httpx.AsyncClient,
) -> None:
    """In a process of its own: this test process has imported OpenTelemetry already."""
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, "--task-type", "T2I", "--sec-per-mpx-step", "0")
        sent = traceparent(span_id="1111111111111111")
        with trio.fail_after(60):
            done = await trio.run_process(
                [sys.executable, "-c", TRACING_OFF, worker.url, sent],
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
            )
        assert done.returncode == 0, done.stdout.decode()
        outcome = json.loads(done.stdout.decode().strip().splitlines()[-1])
        assert outcome == {"status": 200, "opentelemetry": []}
        saw = [r for r in await seen_by(http, worker.url) if r["path"] == "/v1/images/generations"]
        assert [(r["traceparent"], r["tracestate"]) for r in saw] == [(sent, "vendor=off")]
        nursery.cancel_scope.cancel()
