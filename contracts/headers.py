"""NATS header names that are part of the wire contract."""

from __future__ import annotations

# JetStream de-duplication: the request id, so a retried publish never runs twice.
MSG_ID = "Nats-Msg-Id"
# Subject the worker publishes the request's events to (default: `llm.out.<request_id>`).
REPLY = "Llmbus-Reply"
# Absolute deadline, Unix epoch milliseconds; a worker never starts an expired request.
DEADLINE = "Llmbus-Deadline"
# W3C trace context, so direct publishers join the same trace.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
