"""One model's record in the janitor (services/janitor/record.py): what `/api/tags` and `/api/ps`
teach it, and the inventory entry it gives."""

from __future__ import annotations

from datetime import UTC, datetime

from contracts.models import ModelInfo
from services.janitor.desired import Desired, ModelSpec
from services.janitor.record import Context, Failure, ModelRecord, Operation, context_length, observe
from services.runtime.backends.model_admin import Running, Tag

T0 = 1_700_000_000.0


def loaded(name: str, expires: float) -> Running:
    return Running(name=name, size=10, expires_at=datetime.fromtimestamp(expires, UTC).isoformat())


def test_loading_and_a_moved_expiry_are_uses_a_steady_one_is_not() -> None:
    records: dict[str, ModelRecord] = {}
    tag = Tag(name="m:1b", digest="d1")
    observe(records, {"m:1b": tag}, {}, T0)
    assert records["m:1b"].tag == tag and records["m:1b"].last_used is None  # on disk, never used
    observe(records, {"m:1b": tag}, {"m:1b": loaded("m:1b", T0 + 300)}, T0 + 1)
    assert records["m:1b"].last_used == T0 + 1 and records["m:1b"].expiry == T0 + 300  # just loaded
    observe(records, {"m:1b": tag}, {"m:1b": loaded("m:1b", T0 + 300)}, T0 + 5)
    assert records["m:1b"].last_used == T0 + 1  # same expiry: nobody used it
    observe(records, {"m:1b": tag}, {"m:1b": loaded("m:1b", T0 + 310)}, T0 + 10)
    assert records["m:1b"].last_used == T0 + 10  # Ollama moved the expiry: a request came
    observe(records, {"m:1b": tag}, {}, T0 + 20)
    assert records["m:1b"].running is None and records["m:1b"].expiry is None


def test_the_inventory_lists_what_is_on_disk_being_fetched_or_desired_and_failed() -> None:
    desired = Desired(models={"want:1b": ModelSpec(name="want:1b", pinned=True)})
    gone = ModelRecord("gone:1b", last_used=T0)
    assert not gone.listed(desired) and gone.info("h", desired) is None
    failed = ModelRecord("want:1b", failed=Failure("no such model", T0))
    info = failed.info("h", desired)
    assert failed.listed(desired) and info is not None
    assert (info.state, info.error, info.pinned) == ("failed", "no such model", True)
    assert not ModelRecord("other:1b", failed=Failure("x", T0)).listed(desired)  # not desired: not shown
    pulling = ModelRecord("new:1b", op=Operation(op="pull", model="new:1b"))
    assert (pulling.info("h", desired) or _none()).state == "pulling"
    on_disk = ModelRecord("m:1b", tag=Tag(name="m:1b", size=5, digest="d1", context_length=2048))
    on_disk.context = Context("d1", 8192)
    info = on_disk.info("h", desired)
    assert info is not None and (info.state, info.size, info.context_length) == ("available", 5, 8192)
    on_disk.running = loaded("m:1b", T0)
    assert (on_disk.info("h", desired) or _none()).state == "loaded"


def test_a_record_recalls_what_an_earlier_janitor_wrote_and_knows_when_to_ask_again() -> None:
    record = ModelRecord("m:1b")
    written = ModelInfo(
        host="h",
        model="m:1b",
        state="available",
        last_used=T0,
        modelfile_digest="f1",
        digest="d1",
        context_length=4096,
    )
    record.recall(written)
    assert (record.last_used, record.created, record.context) == (T0, "f1", Context("d1", 4096))
    record.tag = Tag(name="m:1b", digest="d1")
    assert not record.context_stale
    record.tag = Tag(name="m:1b", digest="d2")  # re-pulled: its context may differ
    assert record.context_stale
    assert record.failed_within(T0 + 30, 60) is False
    record.failed = Failure("boom", T0)
    assert record.failed_within(T0 + 30, 60) and not record.failed_within(T0 + 61, 60)


def test_the_trained_context_comes_from_the_architectures_key() -> None:
    show = {"model_info": {"general.architecture": "llama", "llama.context_length": 131072}}
    assert context_length(show) == 131072
    assert context_length({"model_info": {"general.architecture": "llama"}}) is None
    assert context_length({}) is None


def _none() -> ModelInfo:
    raise AssertionError("no inventory entry")
