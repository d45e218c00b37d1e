"""The demo page at `/`, driven in headless Chromium against the edge, the generator and the fake Ollama.

Needs Debian's `chromium` (scripts/test.sh installs it); Playwright drives it through
`executable_path`, since browser downloads are not possible here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_janitor import janitor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "demo.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # `auto` without a classifier: the edge routes to the default route's model after this wait.
    return msgspec.structs.replace(settings, route_wait_s=0.1)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; scripts/test.sh does it)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser, client: httpx.AsyncClient, edge: Edge) -> AsyncIterator[Page]:
    opened = await browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    await opened.goto(edge.url + "/")
    await opened.wait_for_selector("body[data-ready=true]")
    yield opened
    assert errors == []  # no script error on the page


async def test_page_and_assets_are_served_with_nothing_from_outside(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert sorted(assets) == ["/static/app.css", "/static/app.js", "/static/favicon.svg"]
    for path in assets:
        asset = await client.get(path)
        assert asset.status_code == 200
        assert "https://" not in asset.text  # no external assets
        assert "http://" not in asset.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    icon = await client.get("/static/favicon.svg")
    assert icon.headers["content-type"].startswith("image/svg+xml")
    missing = await client.get("/static/../app.py")
    assert missing.status_code == 404
    assert (await client.get("/static/nope.js")).json()["error"]["code"] == "not_found"


async def test_page_offers_chat_models_only_as_targets(
    browser: Browser, edge: Edge, settings: Settings, tmp_path: Path
) -> None:
    async with janitor(settings, tmp_path), httpx.AsyncClient(base_url=edge.url) as http:
        async with asyncio.timeout(10):  # the janitor's inventory of the fake's four models
            while len((await http.get("/v1/models")).json()["data"]) < 4:
                await asyncio.sleep(0.05)
        page = await browser.new_page()
        await page.goto(edge.url + "/")
        await page.wait_for_selector("body[data-ready=true]")
        offered = await page.eval_on_selector_all("#models option", "os => os.map(o => o.textContent)")
        await page.close()
    assert "llama3.2:1b" in offered and "qwen2.5-coder:1.5b" in offered
    assert "nomic-embed-text:latest" not in offered  # an embedding model cannot chat


async def states(page: Page) -> list[str]:
    result: list[str] = await page.eval_on_selector_all(".pane", "panes => panes.map(p => p.dataset.state)")
    return result


async def test_page_streams_concurrent_requests_and_cancels_one_upstream(
    page: Page, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    fake_ollama.config.tokens = 40
    fake_ollama.config.token_interval = 0.02  # long enough to cancel one mid-stream
    await page.select_option("#target", "model:llama3.2:1b")
    await page.fill("#prompt", "Name a river, then describe it.")
    await page.fill("#count", "5")
    await page.get_by_role("button", name="Run", exact=True).click()

    cancelled = page.locator("#pane-2")
    await page.wait_for_function("() => document.querySelector('#pane-2 .text').textContent !== ''")
    await page.get_by_role("button", name="Cancel request 2").click()
    [hung_up] = await fake_ollama.wait_disconnected()  # the edge cancelled the model call
    assert hung_up.tokens_sent < 40

    await page.wait_for_function(
        "() => document.querySelectorAll('.pane[data-state=done]').length === 4", timeout=10_000
    )
    assert await states(page) == ["done", "cancelled", "done", "done", "done"]
    for index in (1, 3, 4, 5):
        pane = page.locator(f"#pane-{index}")
        assert await pane.locator(".tokens").inner_text() == "40"
        assert (await pane.locator(".ttft").inner_text()).endswith(" ms")
        assert await pane.locator(".tps").inner_text() != "-"
        assert await pane.locator(".model").inner_text() == "llama3.2:1b"
        assert len((await pane.locator(".text").inner_text()).split()) == 40
    assert int(await cancelled.locator(".tokens").inner_text()) < 40
    assert await cancelled.get_by_role("status").inner_text() == "cancelled"
    chats = [call for call in fake_ollama.calls if call.path == "/api/chat"]
    assert len(chats) == 5 and sum(call.disconnected for call in chats) == 1

    # README's picture is this moment; a test run leaves the tracked copy alone unless asked.
    shot = SCREENSHOT if os.environ.get("LLMBUS_UPDATE_SCREENSHOT") else tmp_path / "demo.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


async def test_page_runs_a_task_and_shows_its_validated_output(page: Page) -> None:
    await page.select_option("#target", "task:extract")
    assert await page.locator("#input-schema").is_visible()  # a field generated from the input schema
    await page.fill("#prompt", "Ada Lovelace met Charles Babbage in London.")
    await page.fill("#count", "1")
    await page.get_by_role("button", name="Run", exact=True).click()
    await page.wait_for_selector("#pane-1[data-state=done]")
    output = await page.locator("#pane-1 .output .json").inner_text()
    assert '"people"' in output and '"places"' in output


async def test_page_shows_the_routed_model_for_auto(page: Page) -> None:
    await page.select_option("#target", "model:auto")
    await page.fill("#count", "2")
    await page.get_by_role("button", name="Run", exact=True).click()
    await page.wait_for_function(
        "() => document.querySelectorAll('.pane[data-state=done]').length === 2", timeout=10_000
    )
    for index in (1, 2):
        model = await page.locator(f"#pane-{index} .model").inner_text()
        assert "(routed: " in model and not model.startswith("auto")  # the model that answered


async def test_page_links_the_trace_of_a_traced_response_to_jaeger(page: Page, edge: Edge) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"

    async def traced(route: Route) -> None:  # what the edge answers when tracing is on
        response = await route.fetch()
        headers = {**response.headers, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        await route.fulfill(response=response, headers=headers)

    await page.route("**/v1/chat", traced)
    await page.goto(edge.url + "/?jaeger=http://127.0.0.1:16686/&count=1&target=model:llama3.2:1b")
    await page.wait_for_selector("body[data-ready=true]")
    await page.get_by_role("button", name="Run", exact=True).click()
    await page.wait_for_selector("#pane-1[data-state=done]")
    link = page.get_by_role("link", name=f"Trace {trace_id} in Jaeger")
    assert await link.get_attribute("href") == f"http://127.0.0.1:16686/trace/{trace_id}"
