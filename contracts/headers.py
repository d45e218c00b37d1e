"""NATS header names that are part of the wire contract."""

from __future__ import annotations

# JetStream de-duplication: the request id, so a retried publish never runs twice.
MSG_ID = "Nats-Msg-Id"
# Subject the worker publishes the request's events to (default: `llm.out.<request_id>`).
REPLY = "Llmbus-Reply"
# Absolute deadline, Unix epoch milliseconds; a worker never starts an expired request.
DEADLINE = "Llmbus-Deadline"
# The `seq` of the first event a worker publishes, when an earlier hop (the classifier) already
# published `start` and `routed`; that worker then continues the numbering and skips `start`.
SEQ = "Llmbus-Seq"
# Who asked, as the edge saw it (`contracts.usage.Origin`, JSON): tenant, key id, API dialect,
# requested model, acceptance time. Carried through routing; workers copy it into `UsageEvent`.
ORIGIN = "Llmbus-Origin"
# W3C trace context, so direct publishers join the same trace.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# On a dead letter in `LLM_DLQ`: why it was given up, where it was published, how often delivered.
DLQ_REASON = "Llmbus-Dlq-Reason"
DLQ_SUBJECT = "Llmbus-Dlq-Subject"
DLQ_DELIVERIES = "Llmbus-Dlq-Deliveries"

# HTTP, not NATS: a request's cache mode (`off`, `exact`, `semantic`, `force`), and on the answer
# whether it came from the response cache (`hit`, `semantic`) or not (`miss`) (docs/cache.md).
CACHE = "Llmbus-Cache"
