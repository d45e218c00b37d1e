"""`POST /v1/classify`: score a text against labels, answered by the classifier over NATS."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from contracts import ErrorBody, ErrorCode, LlmbusError
from contracts.route import CLASSIFY_SUBJECT, ClassifyRequest
from services.edge.admission import Admission
from services.edge.errors import request_id_of
from services.edge.outcome import spent_tokens

_encode = msgspec.json.Encoder().encode
_decode_error = msgspec.json.Decoder(ErrorBody).decode

# The classifier bounds its own model calls ([classify].timeout_s in the routes file); this only
# keeps the edge from waiting forever on a classifier that died mid-request.
CLASSIFY_WAIT_S = 60.0


@post("/v1/classify", summary="Score a text against labels (embedding similarity or an LLM)", status_code=200)
async def classify(
    request: Request[Any, Any, Any],
    data: JSONBody[ClassifyRequest],
    nc: NamedDependency[Client],
    admission: NamedDependency[Admission],
) -> Response[bytes]:
    request_id = request_id_of(request)
    data.validate()
    if data.model is not None:  # else the routes file's default, which every key may use
        admission.check_model(data.model, request.user)
    await admission.check_budget(request.user)
    ticket = await admission.hold(request.user)  # the tenant's rate and in-flight limits, as for any request
    answer = None
    try:
        answer = await nc.request(CLASSIFY_SUBJECT, _encode(data), timeout=CLASSIFY_WAIT_S)
    except NoRespondersError:
        raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, "no classifier is running", retry_after=1) from None
    except (NatsTimeoutError, TimeoutError):
        raise LlmbusError(ErrorCode.DEADLINE_EXCEEDED, "the classifier did not answer in time") from None
    finally:
        if ticket is not None:  # the model calls' tokens count against `tokens_per_minute`
            ticket.give_back(spent_tokens(answer.data) if answer is not None else 0)
    if answer.headers and "Nats-Service-Error-Code" in answer.headers:
        detail = _decode_error(answer.data).error
        raise LlmbusError(detail.code, detail.message, retry_after=detail.retry_after)
    return Response(answer.data, media_type="application/json", headers={"X-Request-Id": request_id})
