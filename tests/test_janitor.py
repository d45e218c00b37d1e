"""The model janitor: desired state, idle and memory-pressure unloads, the inventory, the admin API.

Everything runs against a real nats-server and the fake Ollama, which keeps loaded models with
their `expires_at`, unloads on `keep_alive: 0`, streams pull progress and creates models.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import (
    ModelDetails,
    ModelEvent,
    ModelInfo,
    ModelList,
    ModelRef,
    OpDone,
    OpError,
    OpProgress,
    Progress,
    UsageEvent,
)
from services.janitor import cli as models_cli
from services.janitor import desired, modelfile, policy
from services.janitor.main import JanitorService
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeConfig, FakeOllama
from tests.sse import collect

ROOT = Path(__file__).resolve().parent.parent
decode_event = msgspec.json.Decoder(ModelEvent).decode


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    # The operator's connection, as `llmbus models` makes it: the janitor sends pull progress
    # only into the edge's or the operator's inbox (services/runtime/nats_auth.py).
    conn = await nats.connect(settings.nats_url, inbox_prefix="_INBOX.admin")
    yield conn
    await conn.close()


@pytest.fixture
async def view(nc: Client) -> AsyncIterator[InventoryView]:
    inventory = await InventoryView().start(nc.jetstream())
    yield inventory
    await inventory.stop()


@asynccontextmanager
async def janitor(
    settings: Settings,
    tmp_path: Path,
    toml: str = "",
    *,
    host: str = "local",
    ollama_url: str | None = None,
    **overrides: Any,
) -> AsyncIterator[JanitorService]:
    models_file = tmp_path / f"models-{host}.toml"
    models_file.write_text(toml)
    service = JanitorService(
        msgspec.structs.replace(
            settings,
            models_file=str(models_file),
            janitor_host=host,
            janitor_interval_s=0.05,
            ollama_url=ollama_url or settings.ollama_url,
            **overrides,
        )
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def entry(view: InventoryView, model: str, host: str = "local") -> ModelInfo | None:
    return next((i for i in view.lookup(model) if i.host == host), None)


@asynccontextmanager
async def model_events(nc: Client) -> AsyncIterator[list[ModelEvent]]:
    seen: list[ModelEvent] = []

    async def keep(msg: Any) -> None:
        seen.append(decode_event(msg.data))

    sub = await nc.subscribe(subjects.MODEL_EVENT_PREFIX + ">", cb=keep)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


def unloads(seen: list[ModelEvent]) -> list[tuple[str, str | None]]:
    return [(e.model, e.reason) for e in seen if isinstance(e, OpDone) and e.op == "unload"]


async def use(fake: FakeOllama, model: str, **body: Any) -> None:
    """A client of Ollama using `model` (which loads it), as a generator would."""
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post(
            "/api/generate", json={"model": model, "prompt": "hi", "stream": False, **body}
        )
        response.raise_for_status()


FOREVER = 50 * 365 * 86400


# ---------------------------------------------------------------------------- the policy (pure)


def test_policy_unloads_models_idle_past_their_ttl_but_never_pinned_ones() -> None:
    loaded = [
        policy.Loaded("idle:1b", size=1, last_used=0.0, idle_ttl_s=60),
        policy.Loaded("busy:1b", size=1, last_used=90.0, idle_ttl_s=60),
        policy.Loaded("pinned:1b", size=1, last_used=0.0, idle_ttl_s=60, pinned=True),
        policy.Loaded("forever:1b", size=1, last_used=0.0, idle_ttl_s=None),
    ]
    assert policy.plan(loaded, now=100.0) == [policy.Unload("idle:1b", "idle")]


def test_policy_unloads_least_recently_used_unpinned_models_over_the_memory_budget() -> None:
    loaded = [
        policy.Loaded("newest", size=4, last_used=30.0),
        policy.Loaded("pinned-oldest", size=4, last_used=1.0, pinned=True),
        policy.Loaded("oldest", size=4, last_used=10.0),
        policy.Loaded("middle", size=4, last_used=20.0),
    ]
    # 16 loaded, budget 9: the two least recently used unpinned models go, oldest first.
    assert policy.plan(loaded, now=31.0, budget=9) == [
        policy.Unload("oldest", "memory_budget"),
        policy.Unload("middle", "memory_budget"),
    ]
    assert policy.plan(loaded, now=31.0, budget=16) == []


def test_policy_unloads_while_host_memory_is_above_the_threshold() -> None:
    loaded = [policy.Loaded("a", size=10, last_used=1.0), policy.Loaded("b", size=10, last_used=2.0)]
    busy = policy.HostMemory(total=100, used=90)
    assert policy.plan(loaded, 3.0, host=busy, host_threshold=0.85) == [policy.Unload("a", "host_memory")]
    assert policy.plan(loaded, 3.0, host=policy.HostMemory(total=100, used=80), host_threshold=0.85) == []


def test_host_memory_is_read_from_proc_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n")
    assert policy.read_host_memory(str(meminfo)) == policy.HostMemory(total=1_024_000, used=768_000)
    assert policy.read_host_memory(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------- desired state, Modelfiles


def test_models_toml_gives_durations_sizes_and_this_hosts_models(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "helper.Modelfile").write_text("FROM llama3.2:1b\n")
    path = tmp_path / "models.toml"
    path.write_text(
        """
[defaults]
idle_ttl = "1h30m"
[memory]
budget = "1.5GiB"
host_threshold = 0.9
[[models]]
name = "Llama3.2"
pinned = true
idle_ttl = "never"
[[models]]
name = "helper"
modelfile = "models/helper.Modelfile"
warm = true
[[models]]
name = "big:70b"
hosts = ["gpu2"]
"""
    )
    state = desired.load(path, "gpu1")
    assert set(state.models) == {"llama3.2:latest", "helper:latest"}  # canonical names, gpu1's only
    assert state.default_ttl_s == 5400 and state.memory_budget == int(1.5 * 2**30)
    assert state.host_threshold == 0.9
    assert state.pinned("llama3.2:latest") and state.ttl("llama3.2:latest") is None
    assert state.models["helper:latest"].modelfile == "FROM llama3.2:1b\n"
    assert state.ttl("not-listed:1b") == 5400
    assert desired.load(tmp_path / "absent.toml", "gpu1").models == {}


def test_a_model_for_ollama_only_is_not_desired_of_an_openai_compatible_server(tmp_path: Path) -> None:
    # Such a server cannot pull: the shipped models.toml must not show "failed" under `llmbus up`'s
    # embedded backend.
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "llama3.2:1b"\nbackends = ["ollama"]\n[[models]]\nname = "both"\n')
    assert set(desired.load(path, "local", "ollama").models) == {"llama3.2:1b", "both:latest"}
    assert set(desired.load(path, "local", "openai").models) == {"both:latest"}
    shipped = Path(__file__).parents[1] / "infra" / "models.toml"
    assert desired.load(shipped, "local", "openai").models == {}


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        ("[defaults]\nidle_ttl = 'soon'", "not a duration"),
        ("[memory]\nbudget = 'lots'", "not a size"),
        ("[memory]\nhost_threshold = 85", r"<= 1.0 - at `\$.memory.host_threshold`"),
        ("[[models]]\npinned = true", r"missing required field `name` - at `\$.models\[0\]`"),
        ("[[models]]\nname = 'bad name'", "invalid model name"),
        ("[[models]]\nname = 'x'\nmodelfile = 'nope.Modelfile'", "cannot read Modelfile"),
        ("[[models]]\nname = 'x'\n[[models]]\nname = 'x:latest'", "listed twice"),
        ("[[models]]\nname = 'x'\nkeep = true", r"unknown field `keep` - at `\$.models\[0\]`"),
        ("[[models]]\nname = 'x'\nbackends = ['vllm']", r"'vllm' - at `\$.models\[0\].backends\[0\]`"),
        ("models = [", "models.toml"),
    ],
)
def test_a_broken_models_toml_says_where_and_why(tmp_path: Path, toml: str, complaint: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(toml)
    with pytest.raises(desired.DesiredStateError, match=complaint):
        desired.load(path, "local")


def test_a_modelfile_becomes_the_structured_create_request() -> None:
    spec = modelfile.parse(
        "# comment\nFROM llama3.2:1b\nPARAMETER temperature 0.2\nPARAMETER num_ctx 4096\n"
        'PARAMETER stop "<|end|>"\nPARAMETER stop "User:"\n'
        'SYSTEM """You are\nbrief."""\nMESSAGE user Hi\nMESSAGE assistant Hello\n'
    )
    assert spec.from_ == "llama3.2:1b"
    assert spec.system == "You are\nbrief."
    assert spec.parameters == {"temperature": 0.2, "num_ctx": 4096, "stop": ["<|end|>", "User:"]}
    assert spec.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("SYSTEM hi", "no FROM line"),
        ("FROM x\nADAPTER ./lora.gguf", "ADAPTER is not supported"),
        ("FROM x\nFROBNICATE 1", "unknown instruction"),
        ("FROM ./missing.gguf", "does not exist"),
        ('FROM x\nSYSTEM """never closed', "unterminated"),
        ("FROM x\nMESSAGE robot hi", "MESSAGE role"),
    ],
)
def test_an_unusable_modelfile_is_a_bad_request(text: str, complaint: str) -> None:
    with pytest.raises(LlmbusError, match=complaint) as info:
        modelfile.parse(text)
    assert info.value.code is ErrorCode.BAD_REQUEST


# ---------------------------------------------------------------------------- reconcile


async def test_reconcile_pulls_missing_models_and_creates_custom_ones(
    settings: Settings, fake_ollama: FakeOllama, view: InventoryView, tmp_path: Path
) -> None:
    (tmp_path / "helper.Modelfile").write_text('FROM llama3.2:1b\nSYSTEM "Answer in one line."\n')
    toml = '[[models]]\nname = "phi3:mini"\n[[models]]\nname = "helper"\nmodelfile = "helper.Modelfile"\n'
    async with janitor(settings, tmp_path, toml):
        await until(lambda: all((e := entry(view, m)) and e.ready for m in ("phi3:mini", "helper")))
        helper = entry(view, "helper")
        assert helper is not None and helper.modelfile_digest is not None
        assert entry(view, "llama3.2:1b") is not None  # what was already there is listed too
    pulls = [c.body["model"] for c in fake_ollama.calls if c.path == "/api/pull"]
    creates = [c.body for c in fake_ollama.calls if c.path == "/api/create"]
    assert pulls == ["phi3:mini"]  # llama3.2:1b, the helper's base, was there already
    assert creates == [{"model": "helper:latest", "stream": True, "from": "llama3.2:1b",
                        "system": "Answer in one line."}]  # fmt: skip


async def test_a_changed_modelfile_recreates_the_model_and_a_new_entry_is_pulled(
    settings: Settings, fake_ollama: FakeOllama, view: InventoryView, tmp_path: Path
) -> None:
    model_file = tmp_path / "helper.Modelfile"
    model_file.write_text("FROM llama3.2:1b\nPARAMETER temperature 0.1\n")
    toml = '[[models]]\nname = "helper"\nmodelfile = "helper.Modelfile"\n'
    async with janitor(settings, tmp_path, toml):
        await until(lambda: (e := entry(view, "helper")) is not None and e.ready)
        first = entry(view, "helper")
        model_file.write_text("FROM llama3.2:1b\nPARAMETER temperature 0.9\n")
        (tmp_path / "models-local.toml").write_text(toml + '[[models]]\nname = "gemma3:1b"\n')
        await until(lambda: (e := entry(view, "gemma3:1b")) is not None and e.ready)
        await until(
            lambda: (e := entry(view, "helper")) is not None and e.modelfile_digest != first.modelfile_digest
        )
    creates = [c.body["parameters"] for c in fake_ollama.calls if c.path == "/api/create"]
    assert creates == [{"temperature": 0.1}, {"temperature": 0.9}]


async def test_a_modelfile_from_a_local_gguf_file_is_uploaded_as_a_blob(
    settings: Settings, fake_ollama: FakeOllama, view: InventoryView, tmp_path: Path
) -> None:
    (tmp_path / "badges.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(1000))
    (tmp_path / "badges.Modelfile").write_text("FROM ./badges.Q4_K_M.gguf\nSYSTEM You make badges.\n")
    toml = '[[models]]\nname = "badges"\nmodelfile = "badges.Modelfile"\n'
    async with janitor(settings, tmp_path, toml):
        await until(lambda: (e := entry(view, "badges")) is not None and e.ready)
    [upload] = [c for c in fake_ollama.calls if c.path.startswith("/api/blobs/") and c.method == "POST"]
    [create] = [c.body for c in fake_ollama.calls if c.path == "/api/create"]
    assert create["files"] == {"badges.Q4_K_M.gguf": upload.path.removeprefix("/api/blobs/")}


# ---------------------------------------------------------------------------- unloading


async def test_an_idle_model_is_unloaded_after_its_ttl(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, view: InventoryView, tmp_path: Path
) -> None:
    async with model_events(nc) as seen, janitor(settings, tmp_path, '[defaults]\nidle_ttl = "0.3s"\n'):
        await use(fake_ollama, "qwen2.5:0.5b")
        assert "qwen2.5:0.5b" in fake_ollama.loaded  # Ollama itself would keep it 5 minutes
        await until(lambda: (e := entry(view, "qwen2.5:0.5b")) is not None and e.loaded)
        await fake_ollama.wait_for(lambda: "qwen2.5:0.5b" not in fake_ollama.loaded)
        await until(lambda: (e := entry(view, "qwen2.5:0.5b")) is not None and e.state == "available")
        await until(lambda: bool(unloads(seen)))
    assert unloads(seen) == [("qwen2.5:0.5b", "idle")]
    assert any(c.path == "/api/generate" and c.body.get("keep_alive") == 0 for c in fake_ollama.calls)


async def test_a_pinned_model_is_loaded_at_start_and_never_unloaded(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, view: InventoryView, tmp_path: Path
) -> None:
    toml = '[defaults]\nidle_ttl = "0.2s"\n[[models]]\nname = "qwen2.5:0.5b"\npinned = true\n'
    async with model_events(nc) as seen, janitor(settings, tmp_path, toml):
        await fake_ollama.wait_for(lambda: "qwen2.5:0.5b" in fake_ollama.loaded)
        # A request with Ollama's default keep_alive (5m) would let Ollama drop it: the janitor re-pins.
        await use(fake_ollama, "qwen2.5:0.5b")
        await use(fake_ollama, "llama3.2:1b")  # an unpinned model used at the same time
        await fake_ollama.wait_for(lambda: "llama3.2:1b" not in fake_ollama.loaded)  # its TTL passed
        await fake_ollama.wait_for(
            lambda: fake_ollama.loaded["qwen2.5:0.5b"].timestamp() - time.time() > FOREVER
        )
        pinned = entry(view, "qwen2.5:0.5b")
        assert pinned is not None and pinned.pinned and pinned.loaded
        await until(lambda: bool(unloads(seen)))
    assert "qwen2.5:0.5b" in fake_ollama.loaded
    assert unloads(seen) == [("llama3.2:1b", "idle")]


async def test_least_recently_used_models_are_unloaded_over_the_memory_budget(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, view: InventoryView, tmp_path: Path
) -> None:
    # The fake's sizes: llama3.2:1b 660 MB, qwen2.5:0.5b 350 MB, qwen2.5-coder:1.5b 970 MB.
    toml = '[defaults]\nidle_ttl = "never"\n[memory]\nbudget = "1.5GB"\n'
    async with model_events(nc) as seen, janitor(settings, tmp_path, toml):
        for model in ("llama3.2:1b", "qwen2.5:0.5b"):
            await use(fake_ollama, model)
            await until(lambda m=model: (e := entry(view, m)) is not None and e.loaded)  # type: ignore[misc]
        await use(fake_ollama, "qwen2.5-coder:1.5b")  # 1.98 GB loaded: over the budget
        await fake_ollama.wait_for(lambda: "llama3.2:1b" not in fake_ollama.loaded)
        await until(lambda: bool(unloads(seen)))
    assert set(fake_ollama.loaded) == {"qwen2.5:0.5b", "qwen2.5-coder:1.5b"}
    assert unloads(seen) == [("llama3.2:1b", "memory_budget")]


async def test_usage_events_tell_the_janitor_when_a_model_was_last_used(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, view: InventoryView, tmp_path: Path
) -> None:
    async with janitor(settings, tmp_path, '[defaults]\nidle_ttl = "never"\n'):
        await until(lambda: entry(view, "llama3.2:1b") is not None)
        later = time.time() + 1000  # no other source of "last used" could say this
        usage = UsageEvent(model="llama3.2:1b", kind="generate", request_id="r" * 8, at=later,
                           outcome="done", duration_ms=1.0)  # fmt: skip
        await nc.publish(subjects.usage_subject("llama3.2:1b"), msgspec.json.encode(usage))
        await until(lambda: (e := entry(view, "llama3.2:1b")) is not None and e.last_used == later)


async def test_every_request_publishes_a_usage_event(client: httpx.AsyncClient, nc: Client) -> None:
    sub = await nc.subscribe(subjects.USAGE_SUBJECTS)
    response = await client.post("/v1/generate", json={"model": "llama3.2:1b", "prompt": "hi"})
    assert response.status_code == 200
    msg = await sub.next_msg(timeout=5)
    usage = msgspec.json.decode(msg.data, type=UsageEvent)
    assert msg.subject == "llm.evt.usage.llama3%2E2:1b"
    assert (usage.model, usage.kind, usage.outcome) == ("llama3.2:1b", "generate", "done")
    assert usage.request_id == response.json()["request_id"]
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 0


# ---------------------------------------------------------------------------- admin over NATS


async def test_admin_api_over_nats_lists_shows_loads_and_unloads(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, tmp_path: Path
) -> None:
    admin = AdminClient(nc)
    async with janitor(settings, tmp_path):
        listed = await admin.call("list", None, ModelList)
        assert listed.host == "local"
        assert {m.model for m in listed.models} == {
            "llama3.2:1b", "qwen2.5:0.5b", "qwen2.5-coder:1.5b", "nomic-embed-text:latest"
        }  # fmt: skip
        shown = await admin.call("show", ModelRef("llama3.2:1b"), ModelDetails)
        assert shown.details["family"] == "llama" and "completion" in shown.capabilities

        loaded = await admin.call("load", {"model": "nomic-embed-text"}, ModelInfo)  # embeds to load
        assert loaded.loaded and "nomic-embed-text:latest" in fake_ollama.loaded
        running = await admin.call("ps", None, ModelList)
        assert [m.model for m in running.models] == ["nomic-embed-text:latest"]
        unloaded = await admin.call("unload", ModelRef("nomic-embed-text:latest"), ModelInfo)
        assert not unloaded.loaded and "nomic-embed-text:latest" not in fake_ollama.loaded

        info = await admin.call("copy", {"source": "llama3.2:1b", "destination": "mine:1b"}, ModelInfo)
        assert info.model == "mine:1b" and info.state == "available"
        await admin.call("delete", ModelRef("mine:1b"), dict)
        assert "mine:1b" not in {m.model for m in (await admin.call("list", None, ModelList)).models}

        # $SRV discovery comes with nats.micro: one janitor, its endpoints and host.
        info_reply = json.loads((await nc.request("$SRV.INFO.llmbus-janitor", b"", timeout=2)).data)
        assert info_reply["metadata"]["host"] == "local"
        assert "llm.admin.local.pull" in {e["subject"] for e in info_reply["endpoints"]}


async def test_admin_errors_carry_stable_codes(settings: Settings, nc: Client, tmp_path: Path) -> None:
    admin = AdminClient(nc)
    with pytest.raises(LlmbusError) as no_janitor:
        await admin.call("list", None, ModelList)
    assert no_janitor.value.code is ErrorCode.BACKEND_UNAVAILABLE
    async with janitor(settings, tmp_path, '[[models]]\nname = "qwen2.5:0.5b"\npinned = true\n'):
        for verb, body, code in [
            ("show", ModelRef("no-such-model:7b"), ErrorCode.MODEL_NOT_FOUND),
            ("delete", ModelRef("no-such-model:7b"), ErrorCode.MODEL_NOT_FOUND),
            ("load", {"model": "no-such-model:7b"}, ErrorCode.MODEL_NOT_FOUND),
            ("unload", ModelRef("qwen2.5:0.5b"), ErrorCode.BAD_REQUEST),  # pinned in models.toml
            ("show", {"model": "bad name"}, ErrorCode.BAD_REQUEST),
            ("pull", {"model": "x", "colour": "red"}, ErrorCode.BAD_REQUEST),
            ("create", {"model": "x", "modelfile": "SYSTEM no base"}, ErrorCode.BAD_REQUEST),
        ]:
            with pytest.raises(LlmbusError) as info:
                await admin.call(verb, body, dict)
            assert info.value.code is code, (verb, body)
        reply = await nc.request(subjects.admin_subject("show"), b"{not json", timeout=2)
        assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "400"
        assert json.loads(reply.data)["error"]["code"] == "bad_request"


async def test_pull_over_nats_streams_progress_then_done(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, tmp_path: Path
) -> None:
    admin = AdminClient(nc)
    async with janitor(settings, tmp_path):
        events = [e async for e in await admin.operate("pull", {"model": "qwen2.5:7b"}, None)]
        progress = [e.progress for e in events if isinstance(e, OpProgress)]
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        assert any(p.total > 4_000_000_000 for p in progress)  # the weights layer, in bytes
        assert [p.completed for p in progress] == sorted(p.completed for p in progress)
        done = events[-1]
        assert isinstance(done, OpDone) and done.info is not None and done.info.state == "available"

        fake_ollama.config.pullable = {"qwen2.5:7b"}
        failed = [e async for e in await admin.operate("pull", {"model": "no-such-model:7b"}, None)]
        assert isinstance(failed[-1], OpError) and failed[-1].code is ErrorCode.MODEL_NOT_FOUND

        created = [
            e
            async for e in await admin.operate(
                "create", {"model": "terse", "modelfile": 'FROM qwen2.5:7b\nSYSTEM "Be terse."'}, None
            )
        ]
        assert isinstance(created[-1], OpDone)
        shown = await admin.call("show", ModelRef("terse"), ModelDetails)
        assert shown.system == "Be terse."


# ---------------------------------------------------------------------------- the edge


async def _listed(client: httpx.AsyncClient, model: str) -> dict[str, Any] | None:
    data = (await client.get("/v1/models")).json()["data"]
    return next((m for m in data if m["id"] == model), None)


async def _wait_listed(client: httpx.AsyncClient, model: str, state: str = "available") -> None:
    async with asyncio.timeout(5):
        while not ((m := await _listed(client, model)) and m["hosts"][0]["state"] == state):
            await asyncio.sleep(0.02)


async def test_get_v1_models_lists_the_inventory_in_openai_shape(
    settings: Settings, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    assert (await client.get("/v1/models")).json() == {"object": "list", "data": []}  # no janitor yet
    assert (await client.get("/health/ready")).json()["models"] is None
    async with janitor(settings, tmp_path, '[[models]]\nname = "llama3.2:1b"\nwarm = true\n'):
        await _wait_listed(client, "llama3.2:1b", "loaded")
        body = (await client.get("/v1/models")).json()
        assert body["object"] == "list"
        llama = next(m for m in body["data"] if m["id"] == "llama3.2:1b")
        assert llama["object"] == "model" and llama["ready"] and llama["loaded"]
        assert llama["hosts"][0]["host"] == "local" and llama["hosts"][0]["size"] > 0
        assert (await client.get("/openai/v1/models")).json()["data"] == body["data"]
        running = (await client.get("/v1/models/ps")).json()["data"]
        assert [m["id"] for m in running] == ["llama3.2:1b"]
        assert (await client.get("/health/ready")).json()["models"] == 4  # the fake's four models


async def test_a_request_for_a_model_no_host_has_gets_model_not_found_at_the_edge(
    settings: Settings, fake_ollama: FakeOllama, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with janitor(settings, tmp_path):
        await _wait_listed(client, "llama3.2:1b")
        response = await client.post("/v1/chat", json={"model": "no-such-model:7b", **chat})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert not [c for c in fake_ollama.calls if c.path == "/api/chat"]  # it never reached a worker
        assert (await client.post("/v1/chat", json={"model": "llama3.2:1b", **chat})).status_code == 200


async def test_a_model_being_pulled_is_retry_later_then_served(
    settings: Settings, fake_ollama: FakeOllama, client: httpx.AsyncClient, nc: Client, tmp_path: Path
) -> None:
    fake_ollama.config.pull_step_delay = 0.05
    body = {"model": "qwen2.5:7b", "prompt": "hi"}
    async with janitor(settings, tmp_path):
        await _wait_listed(client, "llama3.2:1b")
        events = await AdminClient(nc).operate("pull", {"model": "qwen2.5:7b"}, None)
        await _wait_listed(client, "qwen2.5:7b", "pulling")
        busy = await client.post("/v1/generate", json=body)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "backend_unavailable"
        assert "being pulled" in busy.json()["error"]["message"] and busy.headers["retry-after"] == "5"
        assert isinstance([e async for e in events][-1], OpDone)
        await _wait_listed(client, "qwen2.5:7b")
        assert (await client.post("/v1/generate", json=body)).status_code == 200


async def test_admin_over_http_pull_streams_progress_as_sse(
    settings: Settings, fake_ollama: FakeOllama, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with janitor(settings, tmp_path):
        await _wait_listed(client, "llama3.2:1b")
        async with client.stream("POST", "/v1/models/pull", json={"model": "gemma3:1b", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = await collect(r)
        assert {e.event for e in events[:-1]} == {"progress"} and events[-1].event == "done"
        assert events[-1].data["info"]["state"] == "available"
        assert [e.id for e in events] == [str(i) for i in range(len(events))]

        fake_ollama.config.pullable = set()
        refused = await client.post("/v1/models/pull", json={"model": "gone:1b"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


async def test_admin_over_http_show_create_copy_load_unload_delete(
    settings: Settings, fake_ollama: FakeOllama, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with janitor(settings, tmp_path):
        await _wait_listed(client, "llama3.2:1b")
        shown = await client.get("/v1/models/llama3.2:1b")
        assert shown.status_code == 200 and shown.json()["details"]["family"] == "llama"

        modelfile_text = 'FROM llama3.2:1b\nSYSTEM "Reply in French."\n'
        created = await client.post(
            "/v1/models/create", json={"model": "french", "modelfile": modelfile_text}
        )
        assert created.status_code == 200 and created.json()["type"] == "done"
        copied = await client.post("/v1/models/copy", json={"source": "french", "destination": "french2"})
        assert copied.status_code == 200 and copied.json()["model"] == "french2:latest"

        loaded = await client.post("/v1/models/load", json={"model": "french2"})
        assert loaded.status_code == 200 and loaded.json()["loaded"] is True
        assert "french2:latest" in fake_ollama.loaded
        unloaded = await client.post("/v1/models/unload", json={"model": "french2"})
        assert unloaded.status_code == 200 and unloaded.json()["loaded"] is False

        deleted = await client.delete("/v1/models/french2")
        assert deleted.status_code == 200
        await _wait_gone(client, "french2:latest")
        missing = await client.delete("/v1/models/french2")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        bad = await client.post("/v1/models/load", json={"model": "x", "when": "now"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"


async def _wait_gone(client: httpx.AsyncClient, model: str) -> None:
    async with asyncio.timeout(5):
        while await _listed(client, model) is not None:
            await asyncio.sleep(0.02)


async def test_the_edge_check_can_be_turned_off(
    settings: Settings, fake_ollama: FakeOllama, generator: Any, tmp_path: Path
) -> None:
    unchecked = msgspec.structs.replace(settings, edge_model_check=False)
    async with (
        janitor(settings, tmp_path),
        Edge(unchecked) as edge,
        httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
    ):
        await _wait_listed(http, "llama3.2:1b")
        response = await http.post("/v1/generate", json={"model": "no-such-model:7b", "prompt": "hi"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    # The backend said so this time: the request went through the queue to a generator.
    assert [c.body["model"] for c in fake_ollama.calls if c.path == "/api/generate"] == ["no-such-model:7b"]


async def test_a_janitor_over_an_unreachable_openai_server_writes_nothing_and_says_so(
    settings: Settings, nc: Client, view: InventoryView, tmp_path: Path
) -> None:
    # The janitor manages OpenAI-compatible hosts too (tests/test_janitor_openai.py, with llama.cpp).
    down = f"http://127.0.0.1:{free_port()}"
    async with janitor(
        settings, tmp_path, '[[models]]\nname = "phi3:mini"\n', backend="openai", backend_url=down
    ):
        await view.synced.wait()
        with pytest.raises(LlmbusError) as caught:
            await AdminClient(nc).call("list", None, ModelList)
        assert caught.value.code is ErrorCode.BACKEND_UNAVAILABLE
        assert view.entries == {}


async def test_admin_over_http_without_a_janitor_is_backend_unavailable(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/pull", json={"model": "llama3.2:1b"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "backend_unavailable"


# ---------------------------------------------------------------------------- several hosts


async def test_each_host_has_its_own_janitor_and_inventory_entries(
    settings: Settings, fake_ollama: FakeOllama, nc: Client, view: InventoryView, tmp_path: Path
) -> None:
    async with (
        FakeOllama(FakeConfig(models=["big:70b"])) as gpu2,
        janitor(settings, tmp_path, host="gpu1"),
        janitor(settings, tmp_path, host="gpu2", ollama_url=gpu2.url),
    ):
        await until(lambda: entry(view, "big:70b", "gpu2") is not None and entry(view, "llama3.2:1b", "gpu1"))
        assert entry(view, "big:70b", "gpu1") is None and entry(view, "llama3.2:1b", "gpu2") is None
        admin = AdminClient(nc, view)
        with pytest.raises(LlmbusError, match="several hosts") as info:
            admin.host_for(None, "new:1b", where_it_is=False)
        assert info.value.code is ErrorCode.BAD_REQUEST
        # A model on one host is managed there without naming it.
        assert admin.host_for(None, "big:70b") == "gpu2"
        loaded = await admin.call("load", {"model": "big:70b"}, ModelInfo, admin.host_for(None, "big:70b"))
        assert loaded.host == "gpu2" and "big:70b" in gpu2.loaded and not fake_ollama.loaded
        events = [e async for e in await admin.operate("pull", {"model": "new:1b"}, "gpu1")]
        assert isinstance(events[-1], OpDone) and events[-1].host == "gpu1"
        assert [c.path for c in gpu2.calls if c.path == "/api/pull"] == []


# ---------------------------------------------------------------------------- the CLI


async def test_cli_pull_shows_progress(settings: Settings, fake_ollama: FakeOllama, tmp_path: Path) -> None:
    fake_ollama.config.pull_step_delay = 0.05  # slow enough for several progress lines
    env = {**os.environ, "LLMBUS_NATS_URL": settings.nats_url, "PYTHONPATH": str(ROOT)}
    async with janitor(settings, tmp_path):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "models", "pull", "qwen2.5:7b",
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "pulling manifest" in text
    assert "100.0% ▕████████████████████████████▏ 4.4 GB/4.4 GB" in text  # the bar, full
    assert any("%" in line and "100.0%" not in line for line in text.splitlines())  # and on its way
    assert text.rstrip().endswith("pull qwen2.5:7b on local: done")


def test_the_progress_bar_shows_percent_and_bytes() -> None:
    line = models_cli.progress_line(Progress("pulling 9ebe980daace", 1_800_000_000, 4_400_000_000))
    assert line == "pulling 9ebe980daace          40.9% ▕███████████                 ▏ 1.8 GB/4.4 GB"
    assert models_cli.progress_line(Progress("verifying sha256 digest")) == "verifying sha256 digest"


async def test_cli_lists_models_and_reports_errors(
    settings: Settings,
    fake_ollama: FakeOllama,
    view: InventoryView,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = models_cli_parser()
    async with janitor(settings, tmp_path, '[[models]]\nname = "qwen2.5:0.5b"\npinned = true\n'):
        await until(lambda: (e := entry(view, "qwen2.5:0.5b")) is not None and e.loaded)
        out = io.StringIO()
        assert await models_cli.run(parser.parse_args(["models", "list"]), settings, out) == 0
        lines = out.getvalue().splitlines()
        assert lines[0].split() == ["MODEL", "HOST", "STATE", "SIZE", "LAST", "USED", "POLICY"]
        assert any(
            line.split()[:3] == ["qwen2.5:0.5b", "local", "loaded"] and "pinned" in line for line in lines
        )
        out = io.StringIO()
        args = parser.parse_args(["models", "rm", "no-such-model:7b"])
        assert await models_cli.run(args, settings, out) == 1
    assert "error: model_not_found" in capsys.readouterr().err


def models_cli_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    models_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser
