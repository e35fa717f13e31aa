"""The `/status` page in a real browser: Debian's Chromium, driven by Playwright.

The page is opened once and never reloaded by the test: it must refresh by itself and show
a worker dying and coming back. Playwright's sync API runs in a thread of its own (it is
not trio); the test's trio side kills and restarts the worker when the thread asks.

Skips without /usr/bin/chromium or the playwright package, unless
DSROUTER_REQUIRE_BROWSER=1 (CI sets it): there a missing browser is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio

from tests.integration.test_proxy import CONFIG, healthy, start_pool
from tests.support import router_process, start_simworker

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Without the background-networking ones Chromium keeps calling home on a closed network."""
STATE_TIMEOUT_MS = 30_000
"""Per change: death takes a few probe rounds, then up to one refresh (5 s) to show."""


def _browser_or_skip() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        reason = "no browser: " + ", ".join(missing)
        if os.environ.get("DSROUTER_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (DSROUTER_REQUIRE_BROWSER=1)")
        pytest.skip(reason)


async def test_the_status_page_in_chromium_shows_a_worker_dying_and_coming_back_by_itself(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, ("--task-type", "T2I"), ("--task-type", "T2I"))
        victim = workers[1]
        async with router_process(
            ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 2)

            async def restart() -> None:
                await start_simworker(
                    nursery, "--sec-per-mpx-step", "0", "--task-type", "T2I", port=victim.port
                )

            def row(url: str, state: str) -> str:
                return f'#workers tr[data-worker="{url}"][data-state="{state}"]'

            def in_the_browser() -> dict[str, object]:
                """Runs in a worker thread; returns what the page went through."""
                profile = tmp_path / "chromium-profile"
                profile.mkdir()
                loads: list[str] = []
                with sync_playwright() as playwright:
                    context = playwright.chromium.launch_persistent_context(
                        str(profile),
                        executable_path=str(CHROMIUM),
                        headless=True,
                        args=CHROMIUM_FLAGS,
                    )
                    try:
                        page = context.new_page()
                        page.on("load", lambda: loads.append(page.url))
                        page.goto(f"{router.url}/status")
                        for worker in workers:
                            page.locator(row(worker.url, "healthy")).wait_for(
                                timeout=STATE_TIMEOUT_MS
                            )
                        title = page.title()
                        loads_before_kill = len(loads)
                        trio.from_thread.run(victim.kill)
                        page.locator(row(victim.url, "dead")).wait_for(timeout=STATE_TIMEOUT_MS)
                        dead_shown = page.locator(
                            f'#workers tr[data-worker="{victim.url}"] .state'
                        ).inner_text()
                        survivor = page.locator(
                            f'#workers tr[data-worker="{workers[0].url}"]'
                        ).get_attribute("data-state")
                        page.screenshot(path=str(tmp_path / "status-dead.png"), full_page=True)
                        trio.from_thread.run(restart)
                        page.locator(row(victim.url, "healthy")).wait_for(timeout=STATE_TIMEOUT_MS)
                        return {
                            "title": title,
                            "dead_shown": dead_shown,
                            "survivor": survivor,
                            "loads_before_kill": loads_before_kill,
                            "loads": len(loads),
                        }
                    finally:
                        context.close()

            with trio.fail_after(3 * STATE_TIMEOUT_MS / 1000 + 60):
                seen = await trio.to_thread.run_sync(in_the_browser)
        nursery.cancel_scope.cancel()

    assert seen["title"] == "dsrouter status"
    assert seen["dead_shown"] == "dead"
    assert seen["survivor"] == "healthy"
    # One navigation by the test; every later load was the page refreshing itself.
    assert seen["loads_before_kill"] >= 1
    assert seen["loads"] > seen["loads_before_kill"]
    assert (tmp_path / "status-dead.png").stat().st_size > 0
