"""What operators look at: the Grafana dashboard and alert rules in `contrib/` refer only to
series a live router exports (and the rules load in Prometheus' own checker); the `/status`
page shows the live pool, its errors and its traffic, and is guarded like `/metrics`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_proxy import CONFIG, healthy, start_pool
from tests.support import (
    routed_pool,
    router_process,
    start_simworker,
    wait_until,
    worker_state,
)

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
ALERTS = CONTRIB / "prometheus" / "alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "dsrouter.json"
PROMETHEUS_SERIES = frozenset({"up"})
"""Series Prometheus makes itself for every scrape target (the router does not export them)."""
TARGET_LABELS = frozenset({"job", "instance", "le"})
"""Labels Prometheus attaches to every scraped series (and `le`, which histograms have)."""
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
NAME = re.compile(r"\bdsrouter_[a-z0-9_]+\b")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")


def expressions() -> list[str]:
    """Every PromQL expression of the rules and the dashboard (panels and variables)."""
    rules = yaml.safe_load(ALERTS.read_text())
    found = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    found += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return found


def referenced(exprs: list[str]) -> dict[str, set[str]]:
    """Series name → label names the expressions select it by."""
    names: dict[str, set[str]] = {}
    for expr in exprs:
        for name in NAME.findall(expr):
            names.setdefault(name, set())
        for name, matchers in SELECTOR.findall(expr):
            names.setdefault(name, set()).update(MATCHER.findall(matchers))
    return names


def exported(text: str) -> dict[str, set[str] | None]:
    """Sample name → label names, as a scraper sees `/metrics`.

    A labelled family with no sample yet (no restart, no retry so far) is declared by its
    `# TYPE` line only: its name maps to None, labels unknown until the first sample."""
    series: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(text):
        if not family.samples:
            suffix = "_total" if family.type == "counter" else ""
            series.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = series.get(sample.name) or set()
            series[sample.name] = labels | set(sample.labels)
    return series


def test_the_rules_and_the_dashboard_select_by_known_labels_only() -> None:
    """Guards the extraction the live test relies on: it must see the expressions at all."""
    names = referenced(expressions())
    assert "dsrouter_worker_state" in names
    assert "state" in names["dsrouter_worker_state"]
    assert "dsrouter_request_duration_seconds_bucket" in names
    assert all(name.startswith("dsrouter_") or name in PROMETHEUS_SERIES for name in names)


T2I = ("--task-type", "T2I", "--sec-per-mpx-step", "0")
"""What `start_pool` gives each worker: image tasks, answered at once."""


async def test_dashboard_and_alerts_use_only_metrics_a_live_router_exports(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=CONFIG) as router:
        workers = router.workers
        for seed in range(4):
            answer = await http.post(
                f"{router.url}/v1/images/generations",
                json={"prompt": "a fox", "size": "64x64", "seed": seed},
            )
            assert answer.status_code == 200
        refit = await http.post(
            f"{router.url}/update_weights_from_disk", json={"model_path": "sim/step-1"}
        )
        assert refit.status_code == 200
        await workers[1].kill()

        async def dead() -> bool:
            return (await worker_state(http, router.url, workers[1].url))["state"] == "dead"

        await wait_until(dead)
        scrape = await http.get(f"{router.url}/metrics")

    # The weight panels: the refit's version for the pool and the worker that still serves.
    samples = {f.name: f.samples for f in text_string_to_metric_families(scrape.text)}
    assert [s.labels for s in samples["dsrouter_pool_weight_version"]] == [
        {"version": "sim/step-1"}
    ]
    versions = {
        s.labels["worker"]: s.labels["version"] for s in samples["dsrouter_worker_weight_version"]
    }
    assert versions[workers[0].url.removeprefix("http://")] == "sim/step-1"
    refits = {
        s.labels["result"]: s.value for s in samples["dsrouter_refits"] if s.name.endswith("_total")
    }
    assert refits == {"success": 1.0}
    series = exported(scrape.text)
    missing = {
        name: labels - TARGET_LABELS
        for name, labels in referenced(expressions()).items()
        if name not in PROMETHEUS_SERIES
        and (
            name not in series
            or (series[name] is not None and not labels - TARGET_LABELS <= series[name])
        )
    }
    assert not missing, f"not exported (name → labels used): {missing}\nexported: {series}"
    for expr in expressions():
        names = NAME.findall(expr)
        if any(name in series and series[name] is None for name in names):
            continue  # a family without samples yet: its labels are not on the page
        grouped = {g.strip() for groups in GROUPING.findall(expr) for g in groups.split(",")}
        available = set().union(*(series.get(name) or set() for name in names))
        assert grouped - TARGET_LABELS <= available, f"{expr} groups by labels nobody has"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_alert_rules_pass_promtool() -> None:
    """`promtool` comes with Debian's `prometheus` package (`apt-get install prometheus`)."""
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def row_state(page: str, url: str) -> str | None:
    """The state the status page shows for the worker at `url` (None: not listed)."""
    match = re.search(rf'<tr data-worker="{re.escape(url)}" data-state="([a-z]+)">', page)
    return match and match.group(1)


async def test_status_page_shows_the_pool_errors_and_traffic_and_a_worker_dying_and_back(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, ("--task-type", "T2I"), ("--task-type", "T2I"))
        async with router_process(
            ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
        ) as router:
            status = f"{router.url}/status"
            await healthy(http, router.url, 2)
            page = await http.get(status)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert [row_state(page.text, w.url) for w in workers] == ["healthy", "healthy"]
            assert '<meta http-equiv="refresh"' in page.text
            assert "<script" not in page.text and "src=" not in page.text
            assert "<p>None.</p>" in page.text

            image = {"prompt": "a fox", "size": "64x64"}
            for _ in range(3):
                answer = await http.post(f"{router.url}/v1/images/generations", json=image)
                assert answer.status_code == 200
            for worker in workers:
                faults = await http.post(f"{worker.url}/_sim/faults", json={"fail_rate": 1.0})
                assert faults.status_code == 200
            failed = await http.post(f"{router.url}/v1/images/generations", json=image)
            assert failed.status_code == 500
            page = (await http.get(status)).text
            errors = page.split('<table id="errors">', 1)[1]
            assert failed.headers["x-request-id"] in errors
            assert "<td>500</td>" in errors
            throughput = re.search(r'id="chart-throughput".*?max ([0-9.e+-]+)', page, re.S)
            assert throughput and float(throughput.group(1)) > 0

            await workers[1].kill()

            async def shown(state: str) -> bool:
                return row_state((await http.get(status)).text, workers[1].url) == state

            await wait_until(lambda: shown("dead"))
            assert row_state((await http.get(status)).text, workers[0].url) == "healthy"
            await start_simworker(
                nursery, "--sec-per-mpx-step", "0", "--task-type", "T2I", port=workers[1].port
            )
            await wait_until(lambda: shown("healthy"))
        nursery.cancel_scope.cancel()


async def test_status_page_is_guarded_like_metrics(tmp_path: Path, http: httpx.AsyncClient) -> None:
    admin = {"authorization": "Bearer t0ken"}
    protected = '[security]\nadmin_token = "t0ken"\nprotect_metrics = true\n'
    async with router_process([], config=protected, tmp_path=tmp_path) as router:
        for path in ("/status", "/metrics"):
            assert (await http.get(f"{router.url}{path}")).status_code == 401
            assert (await http.get(f"{router.url}{path}", headers=admin)).status_code == 200
        assert (
            "No worker is registered"
            in (await http.get(f"{router.url}/status", headers=admin)).text
        )
    (tmp_path / "open").mkdir()
    open_config = '[security]\nadmin_token = "t0ken"\n'
    async with router_process([], config=open_config, tmp_path=tmp_path / "open") as router:
        assert (await http.get(f"{router.url}/status")).status_code == 200
        assert (await http.get(f"{router.url}/workers")).status_code == 401
