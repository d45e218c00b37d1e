"""The edge with its event feeds on nats-py's callback subscriptions (a task per subscription)."""

from typing import Any

from services.edge.main import main
from services.runtime import direct_sub
from services.runtime.settings import Settings


async def _with_task(nc: Any, subject: str, deliver: Any) -> Any:
    async def cb(msg: Any) -> None:
        deliver(msg)

    return await nc.subscribe(subject, cb=cb), False


direct_sub.subscribe = _with_task  # type: ignore[assignment]
main(Settings.from_env())
