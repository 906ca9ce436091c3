"""Long-term agent memory: facts, episodes and summaries that agents write and search, per tenant.

`AgentMemoryStore` (store.py) is the API; the database (models.py, migrations/) is the source of truth,
faiss (index.py) and BM25 (keywords.py) indexes are rebuilt from it; embedder.py turns text into vectors.
"""

from memory_service.agent_memory.embedder import Embedder, HashingEmbedder, MiniLMEmbedder
from memory_service.agent_memory.index import VectorIndex
from memory_service.agent_memory.records import (
    MemoryHit,
    MemoryNotFound,
    MemoryPage,
    MemoryRecord,
    MemoryValidationError,
)
from memory_service.agent_memory.store import AgentMemoryStore

__all__ = ["AgentMemoryStore", "Embedder", "HashingEmbedder", "MemoryHit", "MemoryNotFound", "MemoryPage",
           "MemoryRecord", "MemoryValidationError", "MiniLMEmbedder", "VectorIndex"]
