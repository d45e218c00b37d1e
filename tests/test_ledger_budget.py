"""A burst against a tenant's budget: the spend's overshoot is bounded by the estimate of the
requests in flight at once, not by the size of the burst (scripts/budget_burst.py measures it with
every part in its own process; docs/ledger.md "Budgets" has the numbers)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import msgspec
import pytest

from scripts.budget_burst import BODY, KEYS, burst, spent, tenants_toml
from services.generator.main import Generator
from services.ledger.store import database_url
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_ledger import ledger

BUDGET = 200
ANSWER_TOKENS = 8
# "hello" as the fake counts a chat prompt (its words, 4 a message, 1) plus the answer.
TOKENS_PER_REQUEST = 1 + 4 + 1 + ANSWER_TOKENS
BURST = 48


@pytest.mark.parametrize("edges", [1, 2])
async def test_a_burst_overshoots_a_budget_by_a_bounded_amount(
    settings: Settings, tmp_path: Path, fake_ollama: FakeOllama, generator: Generator, edges: int
) -> None:
    fake_ollama.config.tokens = ANSWER_TOKENS
    fake_ollama.config.token_interval = 0.02  # every request of the burst is in flight at once
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(BUDGET))
    settings = msgspec.structs.replace(
        settings,
        auth="on",
        tenants_file=str(tenants),
        concurrency=BURST,
        database_url=database_url("", str(tmp_path / "data")),
    )
    body = {**BODY, "options": {"num_predict": ANSWER_TOKENS}}
    replicas = [msgspec.structs.replace(settings, http_port=free_port()) for _ in range(edges - 1)]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(ledger(settings))
        edge, *more = [await stack.enter_async_context(Edge(s)) for s in (settings, *replicas)]
        urls = [edge.url, *(e.url for e in more)]
        first = await burst(urls, KEYS["small"], BURST, body)
        assert set(first) <= {200, 429}
        tokens = await spent(edge.url, KEYS["admin"], "small", first[200])
        assert tokens == first[200] * TOKENS_PER_REQUEST
        # Without a reservation at admission all 48 ran: 672 tokens, 472 over a budget of 200 (and
        # each edge replica more). With it, shared by the edges, what runs at once is what the
        # budget's rest covers by the estimate (prompt by characters / 4, answer by num_predict:
        # 10 tokens here, 14 used), and the request that crosses it.
        assert tokens - BUDGET <= BUDGET * (TOKENS_PER_REQUEST / 10 - 1) + TOKENS_PER_REQUEST
        second = await burst(urls, KEYS["small"], 8, body)
        assert second == {429: 8}
        async with httpx.AsyncClient(base_url=edge.url) as http:
            refused = await http.post(
                "/v1/chat", json=body, headers={"Authorization": f"Bearer {KEYS['small']}"}
            )
        assert refused.json()["error"]["code"] == "budget_exceeded"
