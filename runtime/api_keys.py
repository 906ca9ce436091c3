"""ApiKeyStore: API keys that map a caller to a tenant, kept in Redis as hashes only.

A key is `engram_<id>_<secret>`: the id finds the record, the secret is checked against its SHA-256
(random 256-bit secrets need no slow hash). The whole key is returned once, by `create`, and never stored.
Admin keys may manage keys (the `engram keys` command does the same directly against Redis).

Deliberately not here: HTTP, rate limits (the api package).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time

import redis.asyncio as aioredis

from runtime.resources import ApiKey, NewApiKey

KEY_PREFIX = "engram_"


class ApiKeyNotFound(KeyError):
    """No key with this id."""


# HSET only when the hash is empty (or absent); returns 1 when it wrote.
_CREATE_IF_EMPTY = """
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_record(tenant: str, name: str, admin: bool) -> tuple[dict, str]:
    """(the stored record, the whole key to hand out once)."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    record = {"id": key_id, "tenant": tenant, "name": name, "admin": admin,
              "created_ms": int(time.time() * 1000), "sha256": _digest(secret)}
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


class ApiKeyStore:
    """cache_s: how long a verified key is trusted without asking Redis again (a key revoked by another
    process stops working within that time; here, at once)."""

    def __init__(self, redis: aioredis.Redis, *, key_prefix: str = "engram", cache_s: float = 0.0):
        self._redis = redis
        self._hash = f"{key_prefix}:api_keys"
        self.cache_s = cache_s
        self._verified: dict[str, tuple[float, ApiKey]] = {}  # sha256 of the presented key -> (expiry, key)

    async def create(self, tenant: str, *, name: str = "", admin: bool = False) -> NewApiKey:
        record, key = _new_record(tenant, name, admin)
        await self._redis.hset(self._hash, record["id"], json.dumps(record))
        return NewApiKey(**record, key=key)

    async def create_first(self, tenant: str, *, name: str = "", admin: bool = True) -> NewApiKey | None:
        """Create a key only if the store has none, atomically (one Lua script), so that several processes
        starting at once (API replicas, `engram serve`) create exactly one first key. None: keys existed."""
        record, key = _new_record(tenant, name, admin)
        created = await self._redis.eval(_CREATE_IF_EMPTY, 1, self._hash, record["id"], json.dumps(record))
        return NewApiKey(**record, key=key) if created else None

    async def verify(self, presented: str) -> ApiKey | None:
        """The live key record for a presented key, or None (malformed, unknown, revoked or wrong secret)."""
        if not presented.startswith(KEY_PREFIX) or presented.count("_") < 2:
            return None
        digest = _digest(presented)
        cached = self._verified.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        key = await self._verify(presented)
        if key is not None and self.cache_s > 0:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[digest] = (time.monotonic() + self.cache_s, key)
        return key

    async def _verify(self, presented: str) -> ApiKey | None:
        key_id, _, secret = presented[len(KEY_PREFIX):].partition("_")
        raw = await self._redis.hget(self._hash, key_id)
        if raw is None:
            return None
        record = json.loads(raw)
        if record.get("revoked_ms") or not hmac.compare_digest(record["sha256"], _digest(secret)):
            return None
        return ApiKey(**record)

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        records = [json.loads(raw) for raw in (await self._redis.hgetall(self._hash)).values()]
        keys = [ApiKey(**r) for r in records if tenant is None or r["tenant"] == tenant]
        return sorted(keys, key=lambda k: (k.created_ms, k.id))

    async def revoke(self, key_id: str) -> ApiKey:
        raw = await self._redis.hget(self._hash, key_id)
        if raw is None:
            raise ApiKeyNotFound(f"API key {key_id!r} not found")
        record = json.loads(raw)
        record.setdefault("revoked_ms", None)
        self._verified = {d: entry for d, entry in self._verified.items() if entry[1].id != key_id}
        if not record["revoked_ms"]:
            record["revoked_ms"] = int(time.time() * 1000)
            await self._redis.hset(self._hash, key_id, json.dumps(record))
        return ApiKey(**record)

    async def count(self) -> int:
        return await self._redis.hlen(self._hash)
