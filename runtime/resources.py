"""The runtime's public resources as wire types: what the REST API returns, what the SDK parses, and what
`LocalRuntime` hands back in-process, so one piece of user code works against all three.

Times are integer milliseconds since the epoch (as the session store keeps them). Every model ignores
unknown fields when parsed by a client (a newer server may add some) but the request bodies refuse them.

Deliberately not here: storage (sessions, catalog, keys) or HTTP (the `api` package).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from runtime.agents import AGENT_NAME_PATTERN, AgentLimits, MemoryKind, MemorySettings

TaskStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
TERMINAL_TASK_STATUSES = ("completed", "failed", "cancelled")
# Event types of a task's stream; `final` (completed) and `error` (failed or cancelled) end it.
TERMINAL_EVENT_TYPES = ("final", "error")
MAX_INPUT_CHARS = 32_000


class _Resource(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- agents -------------------------------------------------------------------------------------------
class AgentUpdate(_Body):
    """A partial change to an agent: only the fields given are replaced."""

    instructions: str | None = Field(None, min_length=1, max_length=100_000)
    model: str | None = Field(None, min_length=1, max_length=256)
    tools: list[str] | None = None
    memory: MemorySettings | None = None
    limits: AgentLimits | None = None


class Agent(_Resource):
    name: str = Field(pattern=AGENT_NAME_PATTERN)
    instructions: str
    model: str = "default"
    tools: list[str] = Field(default_factory=list)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    limits: AgentLimits = Field(default_factory=AgentLimits)
    builtin: bool = False  # shipped with the runtime: readable by every tenant, not changeable
    created_ms: int = 0
    updated_ms: int = 0


class AgentList(_Resource):
    data: list[Agent]


# ---- tasks and sessions ---------------------------------------------------------------------------------
def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


TaskInput = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS), AfterValidator(_not_blank)]


class TaskCreate(_Body):
    """Submit `input` to `agent`; with `session_id`, the task continues that conversation."""

    agent: str = Field("assistant", pattern=AGENT_NAME_PATTERN)
    input: TaskInput
    session_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:@-]{1,200}$")


class MessageCreate(_Body):
    """A new message to an existing session: it becomes the session's next task."""

    input: TaskInput


class Task(_Resource):
    id: str
    session_id: str
    agent: str
    input: str
    status: TaskStatus
    final_answer: str | None = None
    error: str | None = None
    step_count: int = 0
    created_ms: int
    updated_ms: int

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_TASK_STATUSES


class TaskQuery(_Body):
    """Filters and paging of a task listing (newest first)."""

    status: TaskStatus | None = None
    agent: str | None = Field(None, pattern=AGENT_NAME_PATTERN)
    created_after_ms: int | None = Field(None, ge=0)
    created_before_ms: int | None = Field(None, ge=0)
    limit: int = Field(20, ge=1, le=200)
    cursor: str | None = Field(None, max_length=32)


class TaskPage(_Resource):
    data: list[Task]
    next_cursor: str | None = None


class TaskEvent(_Resource):
    """One entry of a task's event stream; `id` resumes the stream after it (SSE Last-Event-ID)."""

    id: str
    type: str  # step_started, memory_hits, model_tokens, tool_call, tool_result, step_committed, final, error
    data: dict[str, Any] = Field(default_factory=dict)
    task_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENT_TYPES


class StepRecord(_Resource):
    """One committed step of a task: the action, each tool call with its result, memories, usage."""

    index: int
    kind: Literal["action", "summary", "final", "error"]
    model_output: str | None = None
    action: dict[str, Any] | None = None
    observations: list[dict[str, Any]] = Field(default_factory=list)
    retrieved_memories: list[dict[str, Any]] = Field(default_factory=list)
    usage: dict[str, Any] = Field(default_factory=dict)
    started_ms: int
    committed_ms: int


class TaskTranscript(Task):
    steps: list[StepRecord] = Field(default_factory=list)
    summary: str | None = None  # what earlier steps were folded into when the context filled


class Session(_Resource):
    """A conversation: the tasks sent to one agent in order, each with its steps."""

    id: str
    agent: str
    created_ms: int
    tasks: list[TaskTranscript]


# ---- memories ---------------------------------------------------------------------------------------------
class MemoryCreate(_Body):
    text: str = Field(min_length=1, max_length=8000)
    kind: MemoryKind = "fact"
    metadata: dict[str, Any] | None = None


class MemoryPatch(_Body):
    text: str | None = Field(None, min_length=1, max_length=8000)
    metadata: dict[str, Any] | None = None


class MemorySearch(_Body):
    query: str = Field(min_length=1, max_length=8000)
    k: int = Field(5, ge=1, le=100)
    kinds: list[MemoryKind] | None = None
    metadata: dict[str, Any] | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    hybrid: bool = False


class Memory(_Resource):
    id: str
    agent: str
    kind: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    source_session: str | None = None
    created_ms: int
    updated_ms: int


class MemoryHit(_Resource):
    memory: Memory
    score: float


class MemoryHits(_Resource):
    data: list[MemoryHit]


class MemoryPage(_Resource):
    data: list[Memory]
    next_cursor: str | None = None


# ---- API keys ---------------------------------------------------------------------------------------------
class ApiKeyCreate(_Body):
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.:@-]{1,200}$")
    name: str = Field("", max_length=200)
    admin: bool = False  # may create, list and revoke keys


class ApiKey(_Resource):
    id: str
    tenant: str
    name: str = ""
    admin: bool = False
    created_ms: int
    revoked_ms: int | None = None


class ApiKeyList(_Resource):
    data: list[ApiKey]


class NewApiKey(ApiKey):
    key: str  # the secret: shown once, stored only as a hash
