"""The worker's scope stage: what surrounds one request's run.

Its log lines carry the request id (`logs.request_scope`), and it runs in a consumer span, child
of the publisher's trace context carried in the message headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import Span

from services.runtime import logs, tracing
from services.runtime.worker_job import Job, R


@contextmanager
def request_scope(job: Job[R], hdrs: dict[str, str], consumer: str) -> Iterator[Span]:
    with logs.request_scope(job.id), tracing.consume_span(job.msg.subject, job.id, hdrs, consumer) as span:
        yield span
