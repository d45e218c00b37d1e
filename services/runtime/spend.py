"""Tenants' running totals (KV `llm_spend`, written by the ledger) and the budget check on them.

Every edge replica watches the bucket, so a check is a dict lookup on the request path. A spend is
seen within the ledger's batch time (one fetch, one transaction) plus a KV update's propagation.
Requests in flight are not in the totals yet: the edges reserve, at admission, what each may use
(services/edge/quota.py), and the check counts those reservations as spent. Without them a burst
of N requests all passed the check and overshot by N requests' tokens (scripts/budget_burst.py,
docs/ledger.md "Budgets").
"""

from __future__ import annotations

import calendar
import logging
import time

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from contracts import ErrorCode, LlmbusError, subjects
from contracts.ledger import Spend
from services.runtime import bus
from services.runtime.kv_view import KVView

log = logging.getLogger(__name__)

_decode = msgspec.json.Decoder(Spend).decode


async def open_bucket(js: JetStreamContext) -> KeyValue:
    return await bus.key_value(
        js,
        KeyValueConfig(
            bucket=subjects.SPEND_BUCKET,
            description="llmbus spend: <tenant> -> Spend, this day and month (written by the ledger)",
            history=1,
            storage=StorageType.FILE,
        ),
    )


def next_day(now: float) -> float:
    """Unix seconds of the next UTC midnight."""
    return (int(now) // 86400 + 1) * 86400


def next_month(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's limits per UTC day and month; 0 = none. Cost is in `[costs]`'s currency."""

    tokens_per_day: int = 0
    tokens_per_month: int = 0
    cost_per_day: float = 0.0
    cost_per_month: float = 0.0

    @property
    def any(self) -> bool:
        return bool(self.tokens_per_day or self.tokens_per_month or self.cost_per_day or self.cost_per_month)


class SpendView(KVView):
    """Every tenant's totals, kept current by a KV watch."""

    def __init__(self) -> None:
        super().__init__()
        self.spend: dict[str, Spend] = {}

    async def open(self, js: JetStreamContext) -> KeyValue:
        return await open_bucket(js)

    def delete(self, key: str) -> None:
        self.spend.pop(key, None)

    def put(self, key: str, value: bytes) -> None:
        try:
            self.spend[key] = _decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring a malformed spend entry %s", key)

    def check(self, tenant: str, budget: Budget, reserved: int = 0, now: float | None = None) -> None:
        """Raises 429 `budget_exceeded` (Retry-After: the next period) once a budget is spent,
        counting `reserved` tokens (requests in flight, services/edge/quota.py) as spent."""
        spent = self.spend.get(tenant)
        if (spent is None and not reserved) or not budget.any:
            return
        now = time.time() if now is None else now
        t = time.gmtime(now)
        day, month = time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t)
        month_tokens = reserved + (spent.month_tokens if spent is not None and spent.month == month else 0)
        day_tokens = reserved + (spent.day_tokens if spent is not None and spent.day == day else 0)
        over = []
        if budget.tokens_per_month and month_tokens >= budget.tokens_per_month:
            over.append((next_month(now), f"{budget.tokens_per_month} tokens this month"))
        if budget.tokens_per_day and day_tokens >= budget.tokens_per_day:
            over.append((next_day(now), f"{budget.tokens_per_day} tokens today"))
        # Money is not reserved (the edge does not price requests): only the ledger's totals count.
        month_cost = spent.month_cost if spent is not None and spent.month == month else 0.0
        day_cost = spent.day_cost if spent is not None and spent.day == day else 0.0
        if budget.cost_per_month and month_cost >= budget.cost_per_month:
            over.append((next_month(now), f"{budget.cost_per_month:g} this month"))
        if budget.cost_per_day and day_cost >= budget.cost_per_day:
            over.append((next_day(now), f"{budget.cost_per_day:g} today"))
        if over:
            until, what = max(over)
            raise LlmbusError(
                ErrorCode.BUDGET_EXCEEDED,
                f"this key's tenant spent its budget of {what} (UTC); it renews then",
                retry_after=max(1.0, round(until - now)),
            )
