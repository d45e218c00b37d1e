"""Who may do what on the bus: one NATS user (role) per service, each allowed only the subjects it
needs, down to the JetStream API (docs/operations.md "Security: the bus", docs/reliability.md's
permission matrix, tested by tests/test_nats_permissions.py). `nats_auth.py` renders them into
every server config.

What holds for every service user:
* streams: it may read the info of and *create* the streams it uses (a no-op when one exists with
  the same config), never update, purge or delete one; changing a stream is the admin's
  `llmbus provision`. Creating is what lets a service re-create what a restarted NATS lost.
* the request stream: a worker creates, pulls from and acks its own durable consumer only; no
  service but the `dlq` tool (dead letters) and the edge (the routing fallback's queued copy)
  reads or deletes a stream message by sequence.
* events: workers publish `llm.out.<id>` (one token: never an edge's `llm.out.<id>.accepted`
  record) and read events back (a take-over continues after them); only the edge writes records.
* inboxes: each user reads only `_INBOX.<user>.>` (`bus.connect` sets the prefix); workers may
  publish only into a direct publisher's inbox (`_INBOX.publisher.>`, the one reply a request may
  name besides its own `llm.out.<id>`: contracts/subjects.py), the janitor only into the inboxes of
  the edge and the operator that asked it.

To add a service, add one entry to `roles()` built from these pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import batches, route, subjects

REQ, OUT, DLQ = subjects.REQUEST_STREAM, subjects.EVENT_STREAM, subjects.DEAD_LETTER_STREAM
API = "$JS.API"
# The consumers of the request stream, by owner: no other user may use them.
# (`<name>-batch`: the batch lane's, services/runtime/worker.py)
REQUEST_CONSUMERS = ("generator", "embedder", "classifier", "generator-batch", "embedder-batch")
# Where workers publish a request's events: `llm.out.<id>`, never `llm.out.<id>.accepted`.
OWN_EVENTS = subjects.EVENT_PREFIX + "*"
PUBLISHER_INBOXES = subjects.PUBLISHER_INBOX + ">"


@dataclass(frozen=True)
class Role:
    publish: list[str]
    subscribe: list[str]
    deny_publish: list[str] = field(default_factory=list)
    deny_subscribe: list[str] = field(default_factory=list)


def _streams(*streams: str) -> list[str]:
    """Read the info of and create (never update, purge or delete) these streams."""
    return [
        f"{API}.INFO",
        *(f"{API}.STREAM.{verb}.{stream}" for stream in streams for verb in ("INFO", "CREATE")),
    ]


def _kv(bucket: str, *, write: bool) -> list[str]:
    """A KV bucket: create it if missing, get, watch; with `write`, put and create keys."""
    stream = "KV_" + bucket
    allowed = [
        *_streams(stream),
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
        # A watch is an ordered (ephemeral) consumer, re-created after a gap, with flow control.
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.DELETE.{stream}.*",
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]
    return [*allowed, f"$KV.{bucket}.>"] if write else allowed


def _events_read() -> list[str]:
    """Read a request's stored events back from LLM_OUT (direct gets: `services/runtime/events.py`)."""
    return [f"{API}.DIRECT.GET.{OUT}", f"{API}.DIRECT.GET.{OUT}.>"]


def _consume(durable: str, filters: list[str]) -> list[str]:
    """Create, pull from and ack one durable consumer of LLM_REQ: nothing else of the stream."""
    return [
        f"{API}.CONSUMER.CREATE.{REQ}.{durable}",
        *(f"{API}.CONSUMER.CREATE.{REQ}.{durable}.{f}" for f in filters),
        f"{API}.CONSUMER.DURABLE.CREATE.{REQ}.{durable}",
        f"{API}.CONSUMER.INFO.{REQ}.{durable}",
        f"{API}.CONSUMER.MSG.NEXT.{REQ}.{durable}",
        f"$JS.ACK.{REQ}.{durable}.>",
    ]


def _consumer_of(durable: str) -> list[str]:
    """Every API subject that touches the durable `durable` of LLM_REQ (to deny it)."""
    return [
        f"{API}.CONSUMER.CREATE.{REQ}.{durable}",
        f"{API}.CONSUMER.CREATE.{REQ}.{durable}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{REQ}.{durable}",
        f"{API}.CONSUMER.INFO.{REQ}.{durable}",
        f"{API}.CONSUMER.MSG.NEXT.{REQ}.{durable}",
        f"$JS.ACK.{REQ}.{durable}.>",
    ]


def _worker(service: str, durable: str, filters: list[str]) -> Role:
    """What every worker (`services/runtime/worker.py`) needs: the streams, its consumer, cancels,
    events and usage out, its dead letters, discovery (`$SRV.*`, answered through `allow_responses`)."""
    return Role(
        publish=[
            *_streams(REQ, OUT, DLQ),
            *_consume(durable, filters),
            *_events_read(),
            OWN_EVENTS,  # events, stored in LLM_OUT (the default reply subject)
            PUBLISHER_INBOXES,  # or a direct publisher's inbox, named by `Llmbus-Reply`
            subjects.USAGE_SUBJECTS,
            subjects.dead_letter_subject(service),
        ],
        subscribe=[
            subjects.CANCEL_SUBJECTS,
            subjects.LEADER_ELECTED_ADVISORY.format(stream=OUT),
            "$SRV.>",
        ],
    )


def _ledger_reader() -> list[str]:
    """The ledger's read API (`llm.ledger.*`) and its running totals for budgets (KV `llm_spend`)."""
    return [subjects.LEDGER_PREFIX + ">", *_kv(subjects.SPEND_BUCKET, write=False)]


def _ledger() -> Role:
    """`llmbus ledger`: its stream of usage events and one durable consumer of it, the totals
    bucket, and its read API (a micro service); nothing of the request or event streams."""
    usage, durable = subjects.USAGE_STREAM, "ledger"
    return Role(
        publish=[
            f"{API}.INFO",
            f"{API}.STREAM.INFO.{usage}",
            f"{API}.STREAM.INFO.KV_{subjects.SPEND_BUCKET}",
            f"{API}.STREAM.CREATE.{usage}",
            f"{API}.STREAM.UPDATE.{usage}",
            f"{API}.CONSUMER.CREATE.{usage}.{durable}",
            f"{API}.CONSUMER.DURABLE.CREATE.{usage}.{durable}",
            f"{API}.CONSUMER.INFO.{usage}.{durable}",
            f"{API}.CONSUMER.MSG.NEXT.{usage}.{durable}",
            f"{API}.STREAM.MSG.DELETE.{usage}",  # an erased prompt's usage event
            f"$JS.ACK.{usage}.{durable}.>",
            *_kv(subjects.SPEND_BUCKET, write=True),
        ],
        subscribe=[subjects.LEDGER_PREFIX + ">", "$SRV.>"],
    )


def _batches(*, consume: bool) -> list[str]:
    """Batches (services/runtime/batch_store.py): the files' Object Store, the records' and lines'
    KV buckets, the work queue `LLM_BATCH` (each created when missing, never updated); with
    `consume`, its durable consumer `batcher` (`llmbus batcher`), fetched from and acked only."""
    files = "OBJ_" + batches.FILES_BUCKET
    queue, durable = batches.BATCH_STREAM, "batcher"
    allowed = [
        *_kv(batches.BATCHES_BUCKET, write=True),
        *_kv(batches.LINES_BUCKET, write=True),
        *_streams(files, queue),
        f"{API}.STREAM.NAMES",  # nats-py finds an object's stream by its chunks' subject
        # The one purge a service may do: an object's own chunks, when it is replaced or deleted
        # (NATS deletes an object so, by subject); never the batch queue or another stream.
        f"{API}.STREAM.PURGE.{files}",
        f"{API}.STREAM.MSG.GET.{files}",
        f"{API}.DIRECT.GET.{files}",
        f"{API}.DIRECT.GET.{files}.>",
        # Reading an object is an ordered (ephemeral) consumer of its chunks, with flow control.
        f"{API}.CONSUMER.CREATE.{files}",
        f"{API}.CONSUMER.CREATE.{files}.>",
        f"{API}.CONSUMER.DELETE.{files}.*",
        f"$JS.FC.{files}.>",
        f"$O.{batches.FILES_BUCKET}.>",
        batches.BATCH_SUBJECT,
    ]
    if consume:
        allowed += [
            f"{API}.CONSUMER.CREATE.{queue}.{durable}",
            f"{API}.CONSUMER.CREATE.{queue}.{durable}.{batches.BATCH_SUBJECT}",
            f"{API}.CONSUMER.DURABLE.CREATE.{queue}.{durable}",
            f"{API}.CONSUMER.INFO.{queue}.{durable}",
            f"{API}.CONSUMER.MSG.NEXT.{queue}.{durable}",
            f"$JS.ACK.{queue}.{durable}.>",
        ]
    return allowed


def _batcher() -> Role:
    """`llmbus batcher`: runs each line of a batch as a request, as an edge does (publish it, record
    it accepted, follow its events, cancel it), and keeps the batch's files and records. Like the
    edge, it never touches a consumer of the request stream."""
    return Role(
        publish=[
            *_streams(REQ, OUT, DLQ),  # `bus.provision` at start, as every service
            *_events_read(),
            subjects.BATCH_GENERATE_SUBJECTS,  # a line waits in the batch lane (docs/batches.md)
            subjects.BATCH_EMBED_SUBJECTS,
            route.ROUTE_SUBJECT,
            subjects.CANCEL_SUBJECTS,
            subjects.EVENT_SUBJECTS,  # a line's `accepted` record
            *_batches(consume=True),
            # The owner's limits, as the edge's admission: in-flight and rate counters, its spend.
            *_kv(subjects.ADMISSION_BUCKET, write=True),
            *_kv(subjects.SPEND_BUCKET, write=False),
        ],
        subscribe=[subjects.EVENT_SUBJECTS],
        deny_publish=_NO_CONSUMING,
    )


def _join(*roles: Role) -> Role:
    return Role(
        publish=[s for r in roles for s in r.publish],
        subscribe=[s for r in roles for s in r.subscribe],
        deny_publish=[s for r in roles for s in r.deny_publish],
        deny_subscribe=[s for r in roles for s in r.deny_subscribe],
    )


# Consumers of the request stream the edge must never touch.
_NO_CONSUMING = [
    f"{API}.CONSUMER.MSG.NEXT.{REQ}.>",
    f"{API}.CONSUMER.CREATE.{REQ}.>",
    f"{API}.CONSUMER.CREATE.{REQ}",
    f"{API}.CONSUMER.DURABLE.CREATE.{REQ}.>",
    f"$JS.ACK.{REQ}.>",
]


def roles() -> dict[str, Role]:
    generator = _worker("generator", "generator", [subjects.GENERATE_SUBJECTS])
    generator.publish.extend(_consume("generator-batch", [subjects.BATCH_GENERATE_SUBJECTS]))
    # A generator serving a set of models (LLMBUS_GENERATE_MODELS) has a durable named after them.
    generator_hosts = Role(
        publish=[
            f"{API}.CONSUMER.CREATE.{REQ}.*",
            f"{API}.CONSUMER.CREATE.{REQ}.*.{subjects.GENERATE_SUBJECTS}",
            f"{API}.CONSUMER.CREATE.{REQ}.*.{subjects.BATCH_GENERATE_SUBJECTS}",
            f"{API}.CONSUMER.DURABLE.CREATE.{REQ}.*",
            f"{API}.CONSUMER.INFO.{REQ}.*",
            f"{API}.CONSUMER.MSG.NEXT.{REQ}.*",
            f"$JS.ACK.{REQ}.*.>",
        ],
        subscribe=[],
        # ... but never another worker's.
        deny_publish=[
            s for other in REQUEST_CONSUMERS if not other.startswith("generator") for s in _consumer_of(other)
        ],
    )
    return {
        # The HTTP edge: publishes requests, reads their events, never consumes a request stream.
        "edge": Role(
            publish=[
                *_streams(REQ, OUT, DLQ),
                *_events_read(),
                subjects.REQUEST_SUBJECTS,
                subjects.CANCEL_SUBJECTS,
                subjects.EVENT_SUBJECTS,  # `accepted` records, start/routed when it routes a request
                route.CLASSIFY_SUBJECT,
                subjects.ADMIN_PREFIX + ">",
                "$SRV.PING.>",  # readiness: is a generator there?
                "$SRV.INFO.>",  # /v1/queue: the generators and their concurrency
                # Queue depth (`/metrics`, queue_full): consumer info, never their messages.
                f"{API}.CONSUMER.LIST.{REQ}",
                f"{API}.CONSUMER.NAMES.{REQ}",
                f"{API}.CONSUMER.INFO.{REQ}.*",
                # Routing a request itself (no classifier answered): the `llm.req.route` copy it
                # queued goes (the edge put every request there, so it can take nothing it lacks).
                f"{API}.STREAM.MSG.DELETE.{REQ}",
                # /v1/queue: a model's running requests and its oldest waiting one (the edge put
                # every request there; it reads them, never consumes them).
                f"{API}.STREAM.MSG.GET.{REQ}",
                # Its own buckets (route claims, admission counters) and reading the inventory.
                *_kv(route.CLAIMS_BUCKET, write=True),
                *_kv(subjects.ADMISSION_BUCKET, write=True),
                *_kv(subjects.MODELS_BUCKET, write=False),
                *_ledger_reader(),  # /v1/usage, /v1/stats, /v1/history; budgets
                *_batches(consume=False),  # /openai/v1/files and /openai/v1/batches
                # The response cache (docs/cache.md): its bucket, a purge, a hit's usage event.
                *_kv(subjects.RESPONSE_CACHE_BUCKET, write=True),
                f"{API}.STREAM.PURGE.KV_{subjects.RESPONSE_CACHE_BUCKET}",
                subjects.USAGE_SUBJECTS,
            ],
            subscribe=[subjects.EVENT_SUBJECTS],
            deny_publish=_NO_CONSUMING,
        ),
        "generator": _join(generator, generator_hosts),
        "embedder": _join(
            _worker("embedder", "embedder", [subjects.EMBED_SUBJECTS]),
            Role(publish=_consume("embedder-batch", [subjects.BATCH_EMBED_SUBJECTS]), subscribe=[]),
            Role(publish=[*_kv(subjects.EMBED_CACHE_BUCKET, write=True)], subscribe=[]),
        ),
        # Routes `llm.req.route` on to `llm.req.generate.<model>`, and answers `llm.classify`.
        "classifier": _join(
            _worker("classifier", "classifier", [route.ROUTE_SUBJECT]),
            Role(
                publish=[
                    subjects.GENERATE_SUBJECTS,
                    subjects.BATCH_GENERATE_SUBJECTS,  # a batch's routed line stays on the batch lane
                    *_kv(route.CLAIMS_BUCKET, write=True),
                    *_kv(subjects.MODELS_BUCKET, write=False),
                ],
                subscribe=[route.CLASSIFY_SUBJECT],
            ),
        ),
        # One per Ollama host: writes the inventory, answers `llm.admin.*`, hears usage.
        "janitor": Role(
            publish=[
                *_kv(subjects.MODELS_BUCKET, write=True),
                subjects.MODEL_EVENT_PREFIX + ">",
                # Progress of a pull or create, to the inbox of whoever asked (the edge or `llmbus models`).
                "_INBOX.edge.>",
                "_INBOX.admin.>",
            ],
            subscribe=[subjects.ADMIN_PREFIX + ">", subjects.USAGE_SUBJECTS, "$SRV.>"],
        ),
        "ledger": _ledger(),
        "batcher": _batcher(),
        # `llmbus dlq list|replay`: reads and removes dead letters, publishes requests again.
        "dlq": Role(
            publish=[
                *_streams(REQ, OUT, DLQ),
                subjects.REQUEST_SUBJECTS,
                f"{API}.STREAM.MSG.GET.{DLQ}",
                f"{API}.DIRECT.GET.{DLQ}",
                f"{API}.STREAM.MSG.DELETE.{DLQ}",
            ],
            subscribe=[],
        ),
        # Direct NATS publishers (docs/contract.md): requests and cancels in; events come back to
        # their own inbox (`Llmbus-Reply: _INBOX.publisher.<id>`), never to anyone else's subjects.
        "publisher": Role(
            publish=[subjects.REQUEST_SUBJECTS, subjects.CANCEL_SUBJECTS],
            subscribe=[],
        ),
        # The operator (`llmbus provision|models`, `nats` CLI, tests): everything.
        "admin": Role(publish=[">"], subscribe=[">"]),
    }


ROLES = tuple(roles())
