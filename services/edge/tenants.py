"""Tenants, their limits and their API keys: `infra/tenants.toml` (`LLMBUS_TENANTS_FILE`).

```toml
[tenants.acme]
keys = ["sha256:9f86d0..."]     # `llmbus keys new acme` prints a key and this line
max_inflight = 6                # requests running or queued at once; 0 = no limit
requests_per_minute = 120       # 0 = no limit
tokens_per_minute = 100000      # prompt + completion tokens (from each answer's usage); 0 = no limit
models = ["llama3.2:*", "nomic-embed-text*"]   # globs of the model names it may ask for
admin = false                   # may pull, create, copy, load, unload and delete models
tokens_per_day = 2000000        # budgets per UTC day and month, from the ledger's totals: 429
tokens_per_month = 40000000     # `budget_exceeded` until the next period; 0 = no budget
cost_per_day = 5.0              # ... in the currency of `[costs]` in infra/models.toml
cost_per_month = 100.0
```

The edge re-reads the file when it changes (it looks at its mtime at most once a second, on the
request path), so edits to keys and limits apply to the next request without a restart; a broken
edit keeps the previous tenants and logs why.

Only the SHA-256 of a key is stored. A fast hash is enough because the keys `llmbus keys new`
makes carry 256 random bits: nobody can search that space, so the slow, salted hashes that protect
guessable passwords would only add milliseconds to every request.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import logging
import os
import re
import secrets
import sys
import time
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from services.runtime.spend import Budget

log = logging.getLogger(__name__)

KEY_PREFIX = "llmbus_"
RELOAD_CHECK_S = 1.0  # the tenants file's mtime is looked at no more often than this
TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # becomes a KV key part


class Tenant(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str = ""
    keys: tuple[str, ...] = ()
    max_inflight: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    cost_per_day: float = 0.0
    cost_per_month: float = 0.0
    cache: Literal["", "off", "exact", "semantic"] = ""  # the response cache's mode ("": the edge's)

    @property
    def budget(self) -> Budget:
        return Budget(
            tokens_per_day=self.tokens_per_day,
            tokens_per_month=self.tokens_per_month,
            cost_per_day=self.cost_per_day,
            cost_per_month=self.cost_per_month,
        )

    @property
    def limited(self) -> bool:
        return bool(self.max_inflight or self.requests_per_minute or self.tokens_per_minute)

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


# Auth off (`LLMBUS_AUTH=off`): every caller is this tenant, unlimited and admin.
ANONYMOUS = Tenant(name="", admin=True)


class _File(msgspec.Struct, forbid_unknown_fields=True):
    tenants: dict[str, Tenant] = {}


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Keyring:
    """Key hash -> tenant. A lookup hashes the presented key, so no stored secret is ever compared."""

    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self.tenants = tenants
        self._by_hash = {digest: tenant for tenant in tenants.values() for digest in tenant.keys}

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        """The tenants in `path`; a broken file stops the program (at start, before serving)."""
        try:
            return cls.parse(path)
        except TenantsFileError as exc:
            raise SystemExit(str(exc)) from None

    @classmethod
    def parse(cls, path: str | Path) -> Keyring:
        """The tenants in `path`, or `TenantsFileError` saying what is wrong with it."""
        try:
            raw = tomllib.loads(Path(path).read_text())
            parsed = msgspec.convert(raw, _File)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            raise TenantsFileError(f"invalid tenants file {path}: {exc}") from None
        tenants: dict[str, Tenant] = {}
        for name, tenant in parsed.tenants.items():
            if not TENANT_NAME.match(name):
                raise TenantsFileError(
                    f"invalid tenants file {path}: tenant name {name!r} is not [A-Za-z0-9_-]"
                )
            for digest in tenant.keys:
                if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                    raise TenantsFileError(
                        f"invalid tenants file {path}: tenant {name!r} has a key that is not "
                        "`sha256:<64 hex>` (store `llmbus keys hash KEY`, never the key itself)"
                    )
            tenants[name] = msgspec.structs.replace(tenant, name=name)
        return cls(tenants)

    def find(self, key: str) -> Tenant | None:
        return self._by_hash.get(hash_key(key))


class TenantsFileError(ValueError):
    pass


class TenantsFile:
    """The tenants file, re-read when its mtime, size or inode changed (looked at every
    `RELOAD_CHECK_S` at most). A file that no longer parses keeps the tenants it had."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.keyring = Keyring.load(self.path)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> Keyring:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return self.keyring
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return self.keyring
        # Stat before reading: a write that lands after the read changes the stamp again.
        self._stamp = stamp
        try:
            self.keyring = Keyring.parse(self.path)
        except TenantsFileError as exc:
            log.error("%s; keeping the previous tenants until it is fixed", exc)
        else:
            log.info("reloaded %d tenants from %s", len(self.keyring.tenants), self.path)
        return self.keyring


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="make API keys for infra/tenants.toml (LLMBUS_AUTH=on)")
    verbs = keys.add_subparsers(dest="verb", required=True)
    new = verbs.add_parser("new", help="print a new key and the hash to add to a tenant's `keys`")
    new.add_argument("tenant", help="the tenant it is for (only printed in the hint)")
    hashed = verbs.add_parser("hash", help="print the hash of a key (read from stdin when not given)")
    hashed.add_argument("key", nargs="?")


def main(args: argparse.Namespace) -> int:
    if args.verb == "new":
        key = new_key()
        print(key)
        print(
            f"# keep the key above secret; add this to [tenants.{args.tenant}] keys = [...]:", file=sys.stderr
        )
        print(f'"{hash_key(key)}"', file=sys.stderr)
        return 0
    key = args.key if args.key is not None else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0
