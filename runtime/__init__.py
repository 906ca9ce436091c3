"""The agent runtime: the orchestrator that runs agent loops, durable sessions in Redis, the REST API
(`runtime.api`), the Python SDK (`runtime.sdk`), the CLI (`engram`, `runtime.cli`) and the Ray Serve
application (`runtime.serve`). `LocalRuntime` composes it all in one process; `Settings` configures it.

Names are imported on first use (PEP 562): importing a submodule does not load the model worker or Redis.
"""

from runtime.lazy_exports import lazy_getattr

_EXPORTS = {"LocalRuntime": "local", "Settings": "settings"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
