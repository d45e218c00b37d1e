"""Configuration from environment variables, all prefixed `LLMBUS_`.

One struct for every service keeps names and defaults in one place; docs/operations.md lists them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

PREFIX = "LLMBUS_"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    nats_port: int = 4222  # the embedded server started by `llmbus up`
    ollama_url: str = "http://127.0.0.1:11434"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    data_dir: str = ".llmbus"  # embedded NATS storage, relative to the working directory
    concurrency: int = 16  # requests one worker process runs at once
    ack_wait_s: float = 30.0  # JetStream redelivers a request whose worker is silent this long
    max_deliver: int = 5
    dedupe_window_s: float = 120.0  # an Idempotency-Key / Nats-Msg-Id is remembered this long
    event_max_age_s: float = 600.0  # how long request events stay replayable in LLM_OUT
    request_timeout_s: float = 600.0  # upper bound of any request's deadline
    max_body_bytes: int = 1_048_576
    backend_connect_timeout_s: float = 5.0
    shutdown_grace_s: float = 20.0  # SIGTERM lets in-flight requests finish this long
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        fields = set(cls.__struct_fields__)
        raw: dict[str, object] = {
            key[len(PREFIX) :].lower(): value
            for key, value in env.items()
            if key.startswith(PREFIX) and key[len(PREFIX) :].lower() in fields
        }
        raw.update(overrides)
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"invalid configuration: {exc} (environment variables {PREFIX}*)") from None

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        return {PREFIX + name.upper(): str(getattr(self, name)) for name in self.__struct_fields__}
