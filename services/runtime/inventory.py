"""The model inventory: the KV bucket `llm_models`, written by janitors, read by the edge and CLI.

One entry per host and model (`contracts.models.ModelInfo`). Readers keep the whole inventory in
memory through a KV watch, so checking a model on the request path is a dict lookup, never a
KV read.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import ModelInfo, canonical_model
from services.runtime import bus
from services.runtime.kv_view import KVView

log = logging.getLogger(__name__)

encode_info = msgspec.json.Encoder().encode
decode_info = msgspec.json.Decoder(ModelInfo).decode


async def open_bucket(js: JetStreamContext) -> KeyValue:
    return await bus.key_value(
        js,
        KeyValueConfig(
            bucket=subjects.MODELS_BUCKET,
            description="llmbus model inventory: <host>.<model> -> ModelInfo (written by janitors)",
            history=1,
            storage=StorageType.FILE,
        ),
    )


class InventoryView(KVView):
    """Every host's models, kept current by a KV watch."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, ModelInfo] = {}  # KV key -> entry
        self._by_model: dict[str, dict[str, ModelInfo]] = {}  # canonical model -> host -> entry

    async def open(self, js: JetStreamContext) -> KeyValue:
        return await open_bucket(js)

    def delete(self, key: str) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self._by_model.get(canonical_model(old.model), {}).pop(old.host, None)

    def put(self, key: str, value: bytes) -> None:
        try:
            info = decode_info(value)
        except msgspec.DecodeError:
            log.warning("ignoring a malformed inventory entry %s", key)
            return
        self.entries[key] = info
        self._by_model.setdefault(canonical_model(info.model), {})[info.host] = info

    @property
    def populated(self) -> bool:
        """A janitor has written entries: from now on the inventory is the list of models."""
        return self.synced.is_set() and bool(self.entries)

    def hosts(self) -> set[str]:
        return {info.host for info in self.entries.values()}

    def ready_models(self) -> set[str]:
        """The models some host can serve now."""
        return {name for name, hosts in self._by_model.items() if any(i.ready for i in hosts.values())}

    def lookup(self, model: str) -> list[ModelInfo]:
        """The entries of `model` on every host (any spelling Ollama accepts)."""
        return list(self._by_model.get(canonical_model(model), {}).values())

    def require(self, model: str) -> None:
        """Refuses a request for a model no host has; a no-op while no janitor has written entries.

        Raises `model_not_found` when no host has it and `backend_unavailable` (retry later) when
        it is still being pulled or created.
        """
        if not self.populated:
            return
        # The name as sent is almost always the canonical one: try it before normalising.
        hosts = self._by_model.get(model) or self._by_model.get(canonical_model(model)) or {}
        if any(info.ready for info in hosts.values()):
            return
        found = list(hosts.values())
        coming = [info for info in found if info.state in ("pulling", "creating")]
        if coming:
            info = coming[0]
            percent = info.progress.percent if info.progress is not None else None
            done = f" ({percent:g}%)" if percent is not None else ""
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"model {model!r} is being {'pulled' if info.state == 'pulling' else 'created'} "
                f"on {info.host}{done}; retry shortly",
                retry_after=5,
            )
        failed = next((info.error for info in found if info.error), None)
        raise LlmbusError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model {model!r} is not available"
            + (f": {failed}" if failed else "; GET /v1/models lists the models every host has"),
        )
