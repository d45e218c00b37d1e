"""Routes one request from `llm.req.route`: decide, claim, announce, hand on to a generator.

The classifier publishes `start` (seq 0, with the chosen model) and `routed` (seq 1), then
republishes the request to `llm.req.generate.<model>` with `Llmbus-Seq: 2`; the generator continues
from there without a second `start`, so the client sees start, routed, token..., done.

The claim comes after the decision and before the first event: if the edge's fallback routed the
request meanwhile (this classifier was too slow), the classifier drops it without a word.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from contracts import GenerateRequest, headers
from contracts.route import Routed
from services.classifier.router import Router
from services.runtime.handoff import Claims, republish
from services.runtime.worker_job import Job

OWNER = "classifier"


class RouteRequest:
    def __init__(self, js: JetStreamContext, router: Router, claims: Claims) -> None:
        self.js = js
        self.router = router
        self.claims = claims

    async def __call__(self, job: Job[GenerateRequest]) -> None:
        request = job.request
        try:
            decision = await self.router.decide(request)
        except Exception:
            if await self.claims.take(request.id, OWNER):
                raise  # ours to end: the worker turns it into the `error` event
            job.hand_off()
            return
        if not await self.claims.take(request.id, OWNER):
            job.hand_off()  # the edge gave up waiting and routed it to the default model
            return
        if not job.continued:  # else an earlier attempt announced it before it crashed
            await job.start(decision.model)
            await job.emit(
                Routed(
                    seq=job.seq,
                    attempt=job.attempt,
                    model=decision.model,
                    route=decision.route.name,
                    score=decision.score,
                    method=decision.method,
                    why=decision.why,
                    fallback_from=decision.fallback_from,
                )
            )
        deadline = (job.msg.headers or {}).get(headers.DEADLINE)
        routed = msgspec.structs.replace(request, model=decision.model)
        await republish(
            self.js,
            routed,
            reply=job.reply,
            seq=job.seq,
            deadline_ms=deadline,
            origin=(job.msg.headers or {}).get(headers.ORIGIN),
            route=decision.route.name,
        )
        job.hand_off()
