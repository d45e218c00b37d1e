"""The AsyncAPI 3 document of the wire contract (`contracts/asyncapi.yaml`, written by `export.py`):
every channel, its messages and their schemas, from the message types themselves."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import headers, subjects
from contracts.embed import EmbedRequest
from contracts.ledger import (
    Erased,
    HistoryPage,
    HistoryQuery,
    RecordRef,
    RequestRecord,
    Spend,
    StatsQuery,
    StatsReport,
    UsageQuery,
    UsageReport,
)
from contracts.messages import (
    Accepted,
    ErrorBody,
    Event,
    GenerateRequest,
)
from contracts.models import (
    CopyRequest,
    CreateRequest,
    LoadRequest,
    ModelDetails,
    ModelEvent,
    ModelInfo,
    ModelList,
    ModelRef,
    OpAccepted,
    PullRequest,
    UsageEvent,
)
from contracts.queue import Queued, QueueReport
from contracts.route import CLASSIFY_SUBJECT, ROUTE_SUBJECT, ClassifyReply, ClassifyRequest
from contracts.schema_form import normalised

# The janitor's messages (contracts/models.py): usage, lifecycle events, the admin API's bodies.
_MODEL_TYPES = [ModelEvent, UsageEvent, ModelInfo, ModelRef, PullRequest, CreateRequest, CopyRequest]
_MODEL_TYPES += [LoadRequest, OpAccepted, ModelList, ModelDetails]
_MODEL_MESSAGES = ["UsageEvent", "ModelEvent", "ModelRef", "PullRequest", "CreateRequest", "CopyRequest"]
_MODEL_MESSAGES += ["LoadRequest", "UsageQuery", "StatsQuery", "HistoryQuery", "RecordRef"]
# The ledger's read API (contracts/ledger.py).
_MODEL_TYPES += [UsageQuery, UsageReport, StatsQuery, StatsReport, HistoryQuery, HistoryPage, RecordRef]
_MODEL_TYPES += [RequestRecord, Erased, Spend]
# The edge's own (HTTP only, never on the bus): the `queued` SSE event and GET /v1/queue.
_MODEL_TYPES += [Queued, QueueReport]


_DEAD_LETTER_PAYLOAD = (
    "The request's payload exactly as it was published (a GenerateRequest or an EmbedRequest, or bytes "
    "that did not decode: the reason it is here), its other headers kept."
)


def _ref(name: str) -> str:
    return f"#/components/schemas/{name}"


def _asyncapi_form(node: Any) -> Any:
    """msgspec writes OpenAPI's `discriminator: {propertyName, mapping}`; an AsyncAPI Schema Object's
    discriminator is the property name alone (the official parser refuses the object form)."""
    if isinstance(node, dict):
        return {
            key: value["propertyName"]
            if key == "discriminator" and isinstance(value, dict)
            else _asyncapi_form(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_asyncapi_form(item) for item in node]
    return node


def _schema_components(types: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    schemas, components = msgspec.json.schema_components(types, ref_template=_ref("{name}"))
    return list(_asyncapi_form(normalised(list(schemas)))), dict(_asyncapi_form(normalised(components)))


def asyncapi() -> str:
    (event, *_), components = _schema_components(
        [Event, GenerateRequest, EmbedRequest, ClassifyRequest, ClassifyReply, ErrorBody, Accepted]
    )
    components["Event"] = event  # the tagged union: anyOf the event types, discriminated by `type`
    (model_event, *_), model_components = _schema_components(_MODEL_TYPES)
    components |= model_components
    components["ModelEvent"] = model_event  # progress, done or error, discriminated by `type`
    header_schema = {
        "type": "object",
        "properties": {
            headers.MSG_ID: {
                "type": "string",
                "description": "the request id; JetStream de-duplicates on it",
            },
            headers.REPLY: {
                "type": "string",
                "pattern": subjects.REPLY_PATTERN,
                "description": (
                    "subject for the request's events: its own llm.out.<id>, "
                    "or a direct publisher's inbox _INBOX.publisher.…"
                ),
            },
            headers.DEADLINE: {"type": "string", "description": "absolute deadline, Unix epoch milliseconds"},
            headers.SEQ: {
                "type": "string",
                "description": "seq of the first event to publish (set by the classifier: 2)",
            },
            headers.TRACEPARENT: {"type": "string", "description": "W3C trace context"},
            headers.ORIGIN: {
                "type": "string",
                "description": "who asked, as the edge saw it: an Origin as JSON (the ledger records it)",
            },
        },
    }
    dead_letter_headers = {
        "type": "object",
        "properties": {
            headers.DLQ_REASON: {"type": "string", "description": "why the worker gave up"},
            headers.DLQ_SUBJECT: {"type": "string", "description": "where the request was published"},
            headers.DLQ_DELIVERIES: {"type": "string", "description": "how often it was delivered"},
        },
        "required": [headers.DLQ_REASON, headers.DLQ_SUBJECT, headers.DLQ_DELIVERIES],
    }
    doc: dict[str, Any] = {
        "asyncapi": "3.1.0",
        "info": {
            "title": "llmbus",
            "version": "0.1.0",
            "description": "The llmbus wire contract on NATS JetStream (generated by `llmbus contracts`).",
        },
        "defaultContentType": "application/json",
        "channels": {
            "generateRequests": {
                "address": subjects.GENERATE_PREFIX + "{model}",
                "description": "Generation requests, stored in the work-queue stream "
                f"{subjects.REQUEST_STREAM}.",
                "parameters": {"model": {"description": "model name, percent-encoded: `.` becomes `%2E`"}},
                "messages": {"generateRequest": {"$ref": "#/components/messages/GenerateRequest"}},
            },
            "routeRequests": {
                "address": ROUTE_SUBJECT,
                "description": "Requests whose `model` is `auto` or `route:NAME`: the classifier picks a "
                "model, publishes `start` and `routed`, and republishes to generateRequests.",
                "messages": {"generateRequest": {"$ref": "#/components/messages/GenerateRequest"}},
            },
            "classify": {
                "address": CLASSIFY_SUBJECT,
                "description": "Core NATS request/reply (the `llmbus-classify` micro service): score a "
                "text against labels.",
                "messages": {"classifyRequest": {"$ref": "#/components/messages/ClassifyRequest"}},
            },
            "classifyReplies": {
                "address": None,
                "description": "The requester's reply inbox: a ClassifyReply, or an ErrorBody with the "
                "`Nats-Service-Error-Code` header set to the HTTP status.",
                "messages": {
                    "classifyReply": {"$ref": "#/components/messages/ClassifyReply"},
                    "errorBody": {"$ref": "#/components/messages/ErrorBody"},
                },
            },
            "embedRequests": {
                "address": subjects.EMBED_PREFIX + "{model}",
                "description": "Embedding requests, stored in the work-queue stream "
                f"{subjects.REQUEST_STREAM}; answered by `vectors`... and one `embeddings` or `error`.",
                "parameters": {"model": {"description": "model name, percent-encoded: `.` becomes `%2E`"}},
                "messages": {"embedRequest": {"$ref": "#/components/messages/EmbedRequest"}},
            },
            "batchGenerateRequests": {
                "address": subjects.batch_lane(subjects.GENERATE_PREFIX) + "{model}",
                "description": "The batch lane: a batch's generation lines (or any low-priority work), "
                f"in {subjects.REQUEST_STREAM}; a generator takes one only with a slot interactive "
                "requests leave free.",
                "parameters": {"model": {"description": "model name, percent-encoded: `.` becomes `%2E`"}},
                "messages": {"generateRequest": {"$ref": "#/components/messages/GenerateRequest"}},
            },
            "batchEmbedRequests": {
                "address": subjects.batch_lane(subjects.EMBED_PREFIX) + "{model}",
                "description": "The batch lane for embedding requests (see batchGenerateRequests).",
                "parameters": {"model": {"description": "model name, percent-encoded: `.` becomes `%2E`"}},
                "messages": {"embedRequest": {"$ref": "#/components/messages/EmbedRequest"}},
            },
            "requestEvents": {
                "address": subjects.EVENT_PREFIX + "{requestId}",
                "description": "start, token..., then exactly one done or error; kept briefly in "
                f"{subjects.EVENT_STREAM} for resume.",
                "parameters": {"requestId": {}},
                "messages": {"event": {"$ref": "#/components/messages/Event"}},
            },
            "acceptedRequests": {
                "address": subjects.accepted_subject("{requestId}"),
                "description": "The edge records each request it accepted (kept in "
                f"{subjects.EVENT_STREAM}), so another edge can resume it; not matched by requestEvents' "
                "subscribers.",
                "parameters": {"requestId": {}},
                "messages": {"accepted": {"$ref": "#/components/messages/Accepted"}},
            },
            "cancel": {
                "address": subjects.CANCEL_PREFIX + "{requestId}",
                "description": "An empty message cancels the request (core NATS).",
                "parameters": {"requestId": {}},
                "messages": {"cancel": {"$ref": "#/components/messages/Cancel"}},
            },
            "usageEvents": {
                "address": subjects.USAGE_PREFIX + "{model}",
                "description": "After every request's terminal event: core NATS (the janitor's last use), "
                f"kept in {subjects.USAGE_STREAM} for the ledger once it created the stream "
                "(`Nats-Msg-Id: <requestId>.usage`).",
                "parameters": {"model": {"description": "model name, percent-encoded: `.` becomes `%2E`"}},
                "messages": {"usageEvent": {"$ref": "#/components/messages/UsageEvent"}},
            },
            "modelEvents": {
                "address": subjects.MODEL_EVENT_PREFIX + "{host}.{model}",
                "description": "Core NATS: every step a janitor takes (pull/create progress, done with the "
                "unload reason, error); also sent to an admin request's `progress` subject.",
                "parameters": {"host": {}, "model": {"description": "percent-encoded, as above"}},
                "messages": {"modelEvent": {"$ref": "#/components/messages/ModelEvent"}},
            },
            "ledger": {
                "address": subjects.LEDGER_PREFIX + "{verb}",
                "description": "The ledger's read API (micro service `llmbus-ledger`), request/reply: usage "
                "(UsageQuery -> UsageReport), stats (StatsQuery -> StatsReport), history (HistoryQuery -> "
                "HistoryPage), record (RecordRef -> RequestRecord), erase (RecordRef -> Erased); a failure "
                "is an ErrorBody with the `Nats-Service-Error-Code` header. contracts/ledger.py.",
                "parameters": {"verb": {}},
                "messages": {
                    name[0].lower() + name[1:]: {"$ref": f"#/components/messages/{name}"}
                    for name in ("UsageQuery", "StatsQuery", "HistoryQuery", "RecordRef")
                },
            },
            "deadLetters": {
                "address": subjects.dead_letter_subject("{service}"),
                "description": f"Stored in {subjects.DEAD_LETTER_STREAM}: a copy of a request a worker gave "
                "up on (it did not decode or validate, or exhausted its deliveries), with the reason in "
                "headers. `llmbus dlq list|replay` reads and replays them.",
                "parameters": {
                    "service": {"description": "the worker that gave up: generator, embedder, ..."}
                },
                "messages": {"deadLetter": {"$ref": "#/components/messages/DeadLetter"}},
            },
            "modelAdmin": {
                "address": subjects.ADMIN_PREFIX + "{host}.{verb}",
                "description": "The janitor's admin API (micro service `llmbus-janitor`), request/reply: "
                "list, ps (no body), show, delete, unload (ModelRef), pull (PullRequest), create "
                "(CreateRequest), copy (CopyRequest), load (LoadRequest). `llm.admin.{verb}` reaches any "
                "janitor. Replies: ModelList, ModelDetails, OpAccepted or ModelInfo; a failure is an "
                "ErrorBody with the `Nats-Service-Error-Code` header set to the HTTP status.",
                "parameters": {"host": {}, "verb": {}},
                "messages": {
                    name[0].lower() + name[1:]: {"$ref": f"#/components/messages/{name}"}
                    for name in ("ModelRef", "PullRequest", "CreateRequest", "CopyRequest", "LoadRequest")
                },
            },
            "modelAdminAny": {
                "address": subjects.admin_subject("{verb}"),
                "description": "The same admin API, answered by any one janitor.",
                "parameters": {"verb": {}},
                "messages": {
                    name[0].lower() + name[1:]: {"$ref": f"#/components/messages/{name}"}
                    for name in ("ModelRef", "PullRequest", "CreateRequest", "CopyRequest", "LoadRequest")
                },
            },
        },
        "operations": {
            "submit": {"action": "send", "channel": {"$ref": "#/channels/generateRequests"}},
            "submitRouted": {"action": "send", "channel": {"$ref": "#/channels/routeRequests"}},
            "classify": {
                "action": "send",
                "channel": {"$ref": "#/channels/classify"},
                "reply": {"channel": {"$ref": "#/channels/classifyReplies"}},
            },
            "submitEmbed": {"action": "send", "channel": {"$ref": "#/channels/embedRequests"}},
            "followEvents": {"action": "receive", "channel": {"$ref": "#/channels/requestEvents"}},
            "recordAccepted": {"action": "send", "channel": {"$ref": "#/channels/acceptedRequests"}},
            "cancelRequest": {"action": "send", "channel": {"$ref": "#/channels/cancel"}},
            "deadLetter": {"action": "send", "channel": {"$ref": "#/channels/deadLetters"}},
            "followUsage": {"action": "receive", "channel": {"$ref": "#/channels/usageEvents"}},
            "followModelEvents": {"action": "receive", "channel": {"$ref": "#/channels/modelEvents"}},
            "administerModels": {"action": "send", "channel": {"$ref": "#/channels/modelAdmin"}},
            "queryLedger": {"action": "send", "channel": {"$ref": "#/channels/ledger"}},
            "administerAnyJanitor": {"action": "send", "channel": {"$ref": "#/channels/modelAdminAny"}},
        },
        "components": {
            "schemas": components,
            "messages": {
                "GenerateRequest": {"headers": header_schema, "payload": {"$ref": _ref("GenerateRequest")}},
                "EmbedRequest": {"headers": header_schema, "payload": {"$ref": _ref("EmbedRequest")}},
                "Event": {"payload": {"$ref": _ref("Event")}},
                "Cancel": {"payload": {"type": "null"}},
                "Accepted": {"payload": {"$ref": _ref("Accepted")}},
                "DeadLetter": {
                    "headers": dead_letter_headers,
                    "payload": {"description": _DEAD_LETTER_PAYLOAD},
                },
                "ClassifyRequest": {"payload": {"$ref": _ref("ClassifyRequest")}},
                "ClassifyReply": {"payload": {"$ref": _ref("ClassifyReply")}},
                "ErrorBody": {"payload": {"$ref": _ref("ErrorBody")}},
                **{name: {"payload": {"$ref": _ref(name)}} for name in _MODEL_MESSAGES},
                "Queued": {
                    "payload": {"$ref": _ref("Queued")},
                    "description": "SSE only, never on the bus: the edge's `queued` event (seq -1, no "
                    "SSE id) while a streamed request waits for a generator, before `start`.",
                },
            },
        },
    }
    return str(msgspec.yaml.encode(doc).decode())
