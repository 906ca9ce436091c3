"""The whole loop in one process with real parts: Redis, SQLite memory, the ModelWorker running a tiny
random model under structured decoding, the built-in tools and the orchestrator."""

from __future__ import annotations

import asyncio

from sqlalchemy import create_engine, text

from model_worker import save_model
from model_worker.demo_tokenizer import build_demo_tokenizer
from runtime.local import LocalRuntime
from runtime.settings import Settings
from tests.model_worker.engine.engine_fixtures import demo_tokenizer, tiny_checkpoint, tiny_model
from tests.random_model import RANDOM_MODEL_BOUNDS


def test_agent_loop_runs_end_to_end_with_the_real_worker_and_memory(tmp_path, redis_url):
    model_dir = tmp_path / "model"
    save_model(tiny_model(seed=2, max_position_embeddings=4096), model_dir)
    tokenizer = build_demo_tokenizer(model_dir)  # deterministic: the same tokenizer the tiny model was built for
    assert tokenizer.vocab_size == demo_tokenizer().vocab_size
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, model_path=model_dir, embedder="hashing",
                        **RANDOM_MODEL_BOUNDS)

    async def scenario():
        async with LocalRuntime(settings) as runtime:
            submitted, _ = await runtime.service.tasks.submit("t1", "assistant", "What is 6 times 7?")
            runner = asyncio.ensure_future(runtime.orchestrator.run_session(submitted.id))
            events, after = [], "0-0"  # followed live: streamed tokens are dropped when their step commits
            while not events or events[-1][1] not in ("final", "error"):
                batch = await runtime.store.events(submitted.id, after_id=after, block_ms=1000, count=500)
                events, after = events + batch, (batch[-1][0] if batch else after)
            await runner
            state, steps = await runtime.store.load(submitted.id)
            return state, steps, events

    state, steps, events = asyncio.run(scenario())
    assert state.status in ("completed", "failed")  # a random model may run into the step limit
    assert [s.index for s in steps] == list(range(len(steps)))
    assert steps[-1].kind in ("final", "error")
    if state.status == "failed":
        assert state.error  # the reason is recorded
    kinds = [e[1] for e in events]
    assert kinds.count("step_started") >= len(steps) - 1 and kinds.count("step_committed") == len(steps)
    assert "model_tokens" in kinds and kinds[-1] in ("final", "error")
    # every memory_write the log reports was applied once, under the call's idempotency key
    logged = {obs["idempotency_key"] for s in steps if s.kind == "action" for obs in s.observations
              if obs["tool"] == "memory_write" and "result" in obs}
    db = create_engine(settings.resolved_database_url())
    with db.connect() as conn:
        stored = [r.idempotency_key for r in conn.execute(text(
            "SELECT idempotency_key FROM memories WHERE idempotency_key IS NOT NULL AND kind != 'episode'"))]
    assert sorted(stored) == sorted(logged)
    # model actions were produced under the schema: every action step parsed and ran its calls
    for step in steps:
        if step.kind == "action":
            assert step.action["type"] == "tool_calls" and len(step.observations) == len(step.action["calls"])


def test_cli_runs_a_task_and_shows_the_session(tmp_path, redis_url, monkeypatch, capsys):
    from runtime.cli import main

    model_dir = tiny_checkpoint(tmp_path / "model", seed=3)
    for name, value in {"DATA_DIR": tmp_path / "data", "REDIS_URL": redis_url, "MODEL_PATH": model_dir,
                        "EMBEDDER": "hashing", **{k.upper(): v for k, v in RANDOM_MODEL_BOUNDS.items()}}.items():
        monkeypatch.setenv(f"ENGRAM_{name}", str(value))
    assert main(["run", "Add 2 and 2."]) == 0
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("session "))
    session_id, task_id = first.split()[1], first.split()[3]  # "session S  task T", printed before any step
    assert out.splitlines().index(first) < min(i for i, line in enumerate(out.splitlines()) if "step" in line)
    outcome = out.splitlines()[-1]  # "task completed|failed in N steps. ..."
    assert main(["show", task_id]) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[0].startswith(f"task {task_id} (session {session_id}, agent assistant): ")
    assert shown.splitlines()[0].endswith(outcome.split()[1])  # the same status, read back from Redis
    assert main(["show", session_id]) == 0
    assert capsys.readouterr().out.startswith(f"session {session_id} (agent assistant): 1 task(s)")
    assert main(["show", "no-such-task"]) == 1
    assert "error: no task or session 'no-such-task'" in capsys.readouterr().err
    model_line = out.splitlines()[out.splitlines().index(first) + 1]  # ids first, then the model and its window
    assert model_line.startswith(f"model: {model_dir} (context window ") and "ENGRAM_CACHE_BUDGET_MIB=256" in model_line
    assert int(model_line.split("context window ")[1].split()[0]) == 4096  # the tiny model's own; the cache holds more
    assert main(["run", "--session", "sess_nosuchsession", "Add 2 and 2."]) == 1  # not found: 1, as `show`
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "sess_nosuchsession" in err and "ConversationNotFound" not in err, err


def test_cli_run_names_an_unknown_agent_or_session_before_loading_a_model(tmp_path, redis_url, monkeypatch, capsys):
    from runtime.cli import main

    for name, value in {"DATA_DIR": tmp_path / "data", "REDIS_URL": redis_url, "EMBEDDER": "hashing",
                        "MODEL_PATH": tmp_path / "no-model-here"}.items():  # loading it would fail
        monkeypatch.setenv(f"ENGRAM_{name}", str(value))
    for argv, named in ((["run", "--agent", "nope", "Hi."], "agent 'nope' not found"),
                        (["run", "--session", "sess_nosuchsession", "Hi."], "session 'sess_nosuchsession' not found")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"error: {named}" and "starting the runtime" not in err, err


def test_cli_names_a_bad_setting_in_one_line(monkeypatch, capsys):
    """A bad ENGRAM_* variable: one error line naming each variable and the value it had, exit 2, nothing
    started."""
    from runtime.cli import main

    monkeypatch.setenv("ENGRAM_ENGRAM_SHARDS", "-1")
    monkeypatch.setenv("ENGRAM_PORT", "abc")
    for argv in (["run", "Add 2 and 2."], ["serve", "--port", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and "ENGRAM_ENGRAM_SHARDS: Input should be greater than or equal to 0 " \
            "(got '-1')" in err and "ENGRAM_PORT:" in err and "(got 'abc')" in err


def _resume_env(tmp_path, redis_url, monkeypatch) -> Settings:
    model_dir = tiny_checkpoint(tmp_path / "model", seed=3)
    env = {"DATA_DIR": tmp_path / "data", "REDIS_URL": redis_url, "MODEL_PATH": model_dir, "EMBEDDER": "hashing",
           "LEASE_MS": 1500, "KEY_PREFIX": f"resume-{tmp_path.name}",
           **{name.upper(): value for name, value in RANDOM_MODEL_BOUNDS.items()}}
    for name, value in env.items():
        monkeypatch.setenv(f"ENGRAM_{name}", str(value))
    return Settings()


def _submitted(settings: Settings, tenant: str, holder: str | None) -> str:
    """A task of `tenant` submitted and not run; `holder`: a process that claimed its lease, then died."""
    async def submit():
        async with LocalRuntime(settings, tenant=tenant) as runtime:
            task, _ = await runtime.service.tasks.submit(tenant, "assistant", "Add 2 and 2.")
            if holder:
                await runtime.store.claim(task.id, holder, settings.lease_ms)
            return task.id

    return asyncio.run(submit())


def test_cli_resume_takes_over_a_dead_processs_task_of_any_tenant(tmp_path, redis_url, monkeypatch, capsys):
    """`engram resume` right after a crash: the dead process's lease still runs, so it follows the task, takes
    it over when the lease runs out, and finishes it; the task's tenant is its own, not 'default'."""
    from runtime.cli import main

    settings = _resume_env(tmp_path, redis_url, monkeypatch)
    task_id = _submitted(settings, "me", holder="killed-process")
    assert main(["resume", task_id]) == 0
    captured = capsys.readouterr()
    assert f"task {task_id} is held by another process" in captured.err
    assert captured.out.splitlines()[0] == f"resuming task {task_id}"
    assert "final answer" in captured.out or "error" in captured.out  # the task's end, followed live

    async def state():
        async with LocalRuntime(settings, tenant="me") as runtime:
            return await runtime.tasks.get(task_id)

    assert asyncio.run(state()).done
    assert main(["resume", task_id]) == 0 and "nothing left to run" in capsys.readouterr().out


def test_cli_resume_stops_at_an_error_of_the_driving_instead_of_waiting(tmp_path, redis_url, monkeypatch, capsys):
    """The orchestrator failing (a dead model, a database error) ends `engram resume` with its error line; it
    used to wait on the task's events forever."""
    import threading

    from runtime.cli import main
    from runtime.orchestrator import Orchestrator

    settings = _resume_env(tmp_path, redis_url, monkeypatch)
    task_id = _submitted(settings, "default", holder=None)

    async def broken(self, session_id):
        raise RuntimeError("the model worker died")

    monkeypatch.setattr(Orchestrator, "run_session", broken)
    result = []
    runner = threading.Thread(target=lambda: result.append(main(["resume", task_id])), daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "engram resume hung after the orchestrator failed"
    assert result == [2] and "error: RuntimeError: the model worker died" in capsys.readouterr().err


def test_cli_a_dependency_that_fails_at_start_is_one_error_line(tmp_path, monkeypatch, capsys):
    """`engram serve --embedded` with Redis unreachable used to print uvicorn's traceback and exit 3; a database
    driver's multi-line message used to come out whole. Now: one line, exit 2."""
    import socket

    from runtime.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("ENGRAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ENGRAM_EMBEDDER", "hashing")
    monkeypatch.setenv("ENGRAM_MODEL_PATH", str(tiny_checkpoint(tmp_path / "model", seed=3)))
    monkeypatch.setenv("ENGRAM_REDIS_URL", "redis://127.0.0.1:1")
    assert main(["serve", "--embedded", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach Redis") and len(err.splitlines()) == 1, err
    monkeypatch.delenv("ENGRAM_REDIS_URL")
    monkeypatch.setenv("ENGRAM_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert main(["run", "Add 2 and 2."]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress line, then the error
    assert err[-1].startswith("error: OperationalError: ") and not err[-2].startswith("error"), err
