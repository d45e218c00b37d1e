"""Subject and stream names, and the reversible subject-safe encoding of model names.

`.` separates subject tokens and `*`/`>` are wildcards, so a model name such as `llama3.2:3b` is
percent-encoded (`llama3%2E2:3b`) before it becomes a token. `%` itself is encoded, so decoding
is exact.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

REQUEST_STREAM = "LLM_REQ"
EVENT_STREAM = "LLM_OUT"
DEAD_LETTER_STREAM = "LLM_DLQ"
USAGE_STREAM = "LLM_USAGE"  # usage events kept for the ledger (created by the ledger, days of them)

REQUEST_SUBJECTS = "llm.req.>"
EVENT_SUBJECTS = "llm.out.>"
GENERATE_PREFIX = "llm.req.generate."
GENERATE_SUBJECTS = "llm.req.generate.>"
EMBED_PREFIX = "llm.req.embed."
EMBED_SUBJECTS = "llm.req.embed.>"
# The batch lane (docs/batches.md): a batch's lines wait here, apart from interactive requests, so a
# worker takes one only when it has a slot no interactive request is waiting for.
BATCH_LANE_PREFIX = "llm.req.batch."
BATCH_GENERATE_SUBJECTS = BATCH_LANE_PREFIX + "generate.>"
BATCH_EMBED_SUBJECTS = BATCH_LANE_PREFIX + "embed.>"
EMBED_CACHE_BUCKET = "llm_embed_cache"  # KV: float32 vectors shared by every embedder replica
RESPONSE_CACHE_BUCKET = "llm_response_cache"  # KV: answers replayed by every edge (docs/cache.md)
EVENT_PREFIX = "llm.out."
CANCEL_PREFIX = "llm.cancel."
CANCEL_SUBJECTS = "llm.cancel.*"
# Dead letters: `llm.dlq.<service>`, a copy of each request a worker gave up on, with the reason.
DEAD_LETTER_PREFIX = "llm.dlq."
DEAD_LETTER_SUBJECTS = "llm.dlq.>"
# JetStream's advisory when a consumer exhausts `max_deliver` for a message.
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"
# JetStream's advisory when a stream gets a new leader (a clustered stream's leader died).
LEADER_ELECTED_ADVISORY = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}"
# Model lifecycle (contracts/models.py): usage after each request, the janitor's events and admin API.
USAGE_PREFIX = "llm.evt.usage."
USAGE_SUBJECTS = "llm.evt.usage.>"
MODEL_EVENT_PREFIX = "llm.evt.model."
ADMIN_PREFIX = "llm.admin."
MODELS_BUCKET = "llm_models"  # KV: the model inventory, key `<host>.<model>`
ADMISSION_BUCKET = "llm_admission"  # KV: per-tenant request counters and in-flight leases (edges)
SPEND_BUCKET = "llm_spend"  # KV: each tenant's tokens (and cost) this day and month (the ledger's)
# The ledger's read API (micro service `llmbus-ledger`), request/reply: `llm.ledger.<verb>`.
LEDGER_PREFIX = "llm.ledger."

# Names Ollama (and OpenAI-compatible servers) accept: `namespace/name:tag`, at most 200 chars.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/:+]{0,199}$"
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
# Request ids become subject tokens: keep them to a safe alphabet.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_\-]{8,128}$"
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
REQUEST_ID_RULE = "8-128 characters of [A-Za-z0-9_-]"
# Names of Ollama hosts (one janitor each): subject tokens and KV key parts once encoded.
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,62}$")

_UNSAFE = re.compile(r"[%.*>\s]")


def encode_model(model: str) -> str:
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", model)


def decode_model(token: str) -> str:
    return unquote(token)


def generate_subject(model: str) -> str:
    return GENERATE_PREFIX + encode_model(model)


def embed_subject(model: str) -> str:
    return EMBED_PREFIX + encode_model(model)


def batch_lane(subject: str) -> str:
    """`llm.req.generate.<model>` -> `llm.req.batch.generate.<model>` (also a `>` filter)."""
    return BATCH_LANE_PREFIX + subject.removeprefix("llm.req.")


def model_from_subject(subject: str) -> str:
    return decode_model(subject.rsplit(".", 1)[-1])


def request_family(subject: str) -> str:
    """`llm.req.generate.<model>` -> `llm.req.generate` (`llm.req.route` stays): the subject without
    its model token, so span names and metric labels stay few whatever the models."""
    return ".".join(subject.split(".", 3)[:3])


def event_subject(request_id: str) -> str:
    return EVENT_PREFIX + request_id


# Where a request's events may go (`Llmbus-Reply`): its own event subject, or the inbox of a direct
# publisher (the `publisher` NATS user's `_INBOX.publisher.…`). Workers' NATS permissions allow no
# other inbox, and a worker refuses any other reply, so nobody can steer a request's events into
# another request's subjects (its `accepted` record) or another service's inbox.
PUBLISHER_INBOX = "_INBOX.publisher."
REPLY_PATTERN = r"^(llm\.out\.[A-Za-z0-9_\-]{8,128}|_INBOX\.publisher(\.[^.\s*>]+)+)$"
_REPLY = re.compile(REPLY_PATTERN)


def valid_reply(subject: str, request_id: str | None) -> bool:
    """`llm.out.<request_id>` (the request's own events), or a direct publisher's inbox."""
    if len(subject) > 256 or _REPLY.match(subject) is None:
        return False
    return subject.startswith(PUBLISHER_INBOX) or subject == event_subject(request_id or "")


def accepted_subject(request_id: str) -> str:
    """Where the edge records that it accepted a request (not matched by `event_subject`'s subscribers)."""
    return EVENT_PREFIX + request_id + ".accepted"


def cancel_subject(request_id: str) -> str:
    return CANCEL_PREFIX + request_id


def dead_letter_subject(service: str) -> str:
    return DEAD_LETTER_PREFIX + service


def usage_subject(model: str) -> str:
    return USAGE_PREFIX + encode_model(model)


def model_event_subject(host: str, model: str) -> str:
    return f"{MODEL_EVENT_PREFIX}{encode_model(host)}.{encode_model(model)}"


def admin_subject(verb: str, host: str | None = None) -> str:
    """`llm.admin.<verb>` reaches any janitor; `llm.admin.<host>.<verb>` the one for that host."""
    return f"{ADMIN_PREFIX}{encode_model(host)}.{verb}" if host else ADMIN_PREFIX + verb


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def _key_part(text: str) -> str:
    # KV keys allow only `[-/_=.A-Za-z0-9]` and `.` splits tokens, so escape as `=XX`.
    return _KEY_UNSAFE.sub(lambda m: f"={ord(m.group()):02X}", text)


def inventory_key(host: str, model: str) -> str:
    return f"{_key_part(host)}.{_key_part(model)}"


def inventory_host_keys(host: str) -> str:
    return _key_part(host) + ".*"
