"""The `engram` command line.

Embedded (this process, ENGRAM_* settings): `engram run "task"`, `engram show ID`, `engram resume ID`
(also as `engram sessions resume ID`), `engram keys create|revoke|list`, `engram serve --embedded`.
`engram serve`: the HTTP API as a Ray Serve application on a local Ray instance (or `--address`).
Against a server (--url / ENGRAM_URL, --api-key / ENGRAM_API_KEY): `engram tasks list|show|logs|submit|
cancel`, `engram sessions show|send`, `engram memories search|add|list`.
Errors are one line on stderr with a non-zero exit (1: the request failed, 2: bad usage or setup).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import redis.exceptions
from pydantic import ValidationError

from runtime.cli import embedded, remote
from runtime.sdk.errors import ConnectionFailed, EngramError


def _server_options(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument("--url", default=default, help="server URL (default $ENGRAM_URL or http://127.0.0.1:8080)")
    parser.add_argument("--api-key", default=default, help="API key (default $ENGRAM_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Agents with durable sessions and long-term memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a task here (embedded), printing each step as it happens")
    run.add_argument("task")
    run.add_argument("--agent", default="assistant")
    run.add_argument("--tenant", default="default")
    run.add_argument("--session", help="continue this session (an id printed by an earlier run)")
    run.add_argument("--strict", action="store_true", help="exit 1 unless the task completed")
    for name, text in (("show", "print a task or session from Redis"),
                       ("resume", "resume a task or session whose process died")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("id", help="a task id or session id")

    serve = sub.add_parser("serve", help="run the HTTP API server: a Ray Serve application on a local Ray instance "
                           "(or --address), or one process with --embedded",
                           description="Serve the HTTP API. By default as a Ray Serve application (memory service, "
                           "model worker and API ingress as separate deployments) on a local Ray instance started "
                           "here, or on the cluster at --address; --embedded runs everything in this process.")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    mode = serve.add_mutually_exclusive_group()
    mode.add_argument("--embedded", action="store_true", help="one process, no Ray: API, orchestrator, memory "
                      "service and model worker here")
    mode.add_argument("--ray", action="store_true", help="on Ray Serve (the default; kept as an alias)")
    serve.add_argument("--address", help="join this Ray cluster (e.g. auto, HOST:PORT) instead of starting one")

    keys = sub.add_parser("keys", help="create, revoke or list API keys (directly in Redis)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--admin", action="store_true",
                        help="an operator key: may create, list and revoke the keys of every tenant over the API")
    keys_sub.add_parser("revoke").add_argument("key_id")
    keys_sub.add_parser("list").add_argument("--tenant")

    tasks = sub.add_parser("tasks", help="tasks on a server")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    listing = tasks_sub.add_parser("list")
    listing.add_argument("--status", choices=["pending", "running", "completed", "failed", "cancelled"])
    listing.add_argument("--agent")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--cursor")
    tasks_sub.add_parser("show").add_argument("task_id")
    logs = tasks_sub.add_parser("logs")
    logs.add_argument("task_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until the task ends")
    submit = tasks_sub.add_parser("submit")
    submit.add_argument("input")
    submit.add_argument("--agent")
    submit.add_argument("--session")
    submit.add_argument("-f", "--follow", action="store_true")
    tasks_sub.add_parser("cancel").add_argument("task_id")

    sessions = sub.add_parser("sessions", help="sessions (conversations)")
    sessions_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    sessions_sub.add_parser("show", help="on a server").add_argument("session_id")
    send = sessions_sub.add_parser("send", help="on a server: continue the session with a new task")
    send.add_argument("session_id")
    send.add_argument("input")
    sessions_sub.add_parser("resume", help="embedded, like `engram resume`").add_argument("id")

    memories = sub.add_parser("memories", help="an agent's long-term memories on a server")
    memories_sub = memories.add_subparsers(dest="memories_command", required=True)
    search = memories_sub.add_parser("search")
    search.add_argument("agent")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    add = memories_sub.add_parser("add")
    add.add_argument("agent")
    add.add_argument("text")
    add.add_argument("--kind", default="fact", choices=["fact", "episode", "summary"])
    add.add_argument("--metadata", help="a JSON object")
    mem_list = memories_sub.add_parser("list")
    mem_list.add_argument("agent")
    mem_list.add_argument("--limit", type=int, default=50)
    mem_list.add_argument("--cursor")
    for command in (tasks, sessions, memories):
        _server_options(command)
    for subparsers in (tasks_sub, sessions_sub, memories_sub):
        for child in subparsers.choices.values():
            if child.prog.split()[-1] != "resume":  # given after the subcommand, or before it (not overwritten)
                _server_options(child, default=argparse.SUPPRESS)
    return parser


def _dispatch(args) -> int:
    if args.command == "serve":
        return embedded.serve(args)
    if args.command == "sessions" and args.sessions_command == "resume":
        return asyncio.run(embedded.resume(args))
    handler = {"run": embedded.run, "show": embedded.show, "resume": embedded.resume, "keys": embedded.keys,
               "tasks": remote.tasks, "sessions": remote.sessions, "memories": remote.memories}[args.command]
    return asyncio.run(handler(args))


def one_line(exc: ValidationError) -> str:
    """A settings ValidationError as one line naming the environment variables: `ENGRAM_X: why (got 'v')`."""
    if exc.title != "Settings":
        return f"{exc.title}: " + "; ".join(error["msg"] for error in exc.errors())
    return "; ".join(f"ENGRAM_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']} "
                     f"(got {error.get('input')!r})" for error in exc.errors())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a server logs its warnings; a one-shot command's failure is its one error line
    logging.basicConfig(level=logging.WARNING if args.command == "serve" else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except redis.exceptions.ConnectionError as exc:
        print(f"error: cannot reach Redis ({exc}); check ENGRAM_REDIS_URL, or unset it to use the embedded one",
              file=sys.stderr)
        return 2
    except ConnectionFailed as exc:
        print(f"error: {exc} (is `engram serve` running there?)", file=sys.stderr)
    except EngramError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ValidationError as exc:  # a bad ENGRAM_* setting (the commands' own input is checked where it is used)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a setting the runtime refused as it started (ENGRAM_TOOLS, the device, ...)
        lines = str(exc).strip().splitlines()
        print(f"error: {lines[0] if lines else 'ValueError'}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a dependency failed (Redis, database, checkpoint): one line, not a traceback
        lines = str(exc).strip().splitlines()  # a driver's message may run on (hints, a "Background" link)
        print(f"error: {type(exc).__name__}: {lines[0] if lines else 'no message'}", file=sys.stderr)
        return 2
    return 1
