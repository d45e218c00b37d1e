"""Tenants, their limits and their API keys: `infra/tenants.toml` (`LLMBUS_TENANTS_FILE`).

```toml
[tenants.acme]
keys = ["sha256:9f86d0..."]     # `llmbus keys new acme` prints a key and this line
max_inflight = 6                # requests running or queued at once; 0 = no limit
requests_per_minute = 120       # 0 = no limit
tokens_per_minute = 100000      # prompt + completion tokens (from each answer's usage); 0 = no limit
models = ["llama3.2:*", "nomic-embed-text*"]   # globs of the model names it may ask for
admin = false                   # may pull, create, copy, load, unload and delete models
```

Only the SHA-256 of a key is stored. A fast hash is enough because the keys `llmbus keys new`
makes carry 256 random bits: nobody can search that space, so the slow, salted hashes that protect
guessable passwords would only add milliseconds to every request.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import re
import secrets
import sys
import tomllib
from pathlib import Path

import msgspec

KEY_PREFIX = "llmbus_"
TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # becomes a KV key part


class Tenant(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str = ""
    keys: tuple[str, ...] = ()
    max_inflight: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    models: tuple[str, ...] = ("*",)
    admin: bool = False

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
        try:
            raw = tomllib.loads(Path(path).read_text())
            parsed = msgspec.convert(raw, _File)
        except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            raise SystemExit(f"invalid tenants file {path}: {exc}") from None
        tenants: dict[str, Tenant] = {}
        for name, tenant in parsed.tenants.items():
            if not TENANT_NAME.match(name):
                raise SystemExit(f"invalid tenants file {path}: tenant name {name!r} is not [A-Za-z0-9_-]")
            for digest in tenant.keys:
                if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                    raise SystemExit(
                        f"invalid tenants file {path}: tenant {name!r} has a key that is not "
                        "`sha256:<64 hex>` (store `llmbus keys hash KEY`, never the key itself)"
                    )
            tenants[name] = msgspec.structs.replace(tenant, name=name)
        return cls(tenants)

    def find(self, key: str) -> Tenant | None:
        return self._by_hash.get(hash_key(key))


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
