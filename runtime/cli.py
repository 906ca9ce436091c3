"""Command line: run an agent task on the embedded default (`python -m runtime.cli run "task"`).

Everything starts in this process (see `runtime.local`); the session is durable in Redis, so
`resume SESSION_ID` picks up a session whose process died. `show SESSION_ID` prints its step log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from runtime.local import LocalRuntime
from runtime.sessions import SessionState, Step


def _print_session(state: SessionState, steps: list[Step]) -> None:
    print(f"session {state.session_id} ({state.agent}, tenant {state.tenant}): {state.status}")
    for step in steps:
        if step.kind == "action":
            for obs in step.observations:
                outcome = obs.get("result", obs.get("error"))
                print(f"  step {step.index}: {obs['tool']}({json.dumps(obs['arguments'])[:80]}) -> "
                      f"{json.dumps(outcome)[:100]}")
        elif step.kind == "summary":
            print(f"  step {step.index}: summarized earlier turns")
        elif step.kind == "final":
            print(f"  step {step.index}: final answer: {state.final_answer!r}")
        else:
            print(f"  step {step.index}: error: {state.error}")


async def _main(args: argparse.Namespace) -> int:
    async with LocalRuntime() as runtime:
        if runtime.settings.model_path is None and args.command in ("run", "resume"):
            print("note: the demo checkpoint has random weights, so its actions are schema-valid but meaningless "
                  "(set ENGRAM_MODEL_PATH to serve a real checkpoint)")
        if args.command == "run":
            state, steps = await runtime.run_task(args.task, tenant=args.tenant, agent=args.agent)
        elif args.command == "resume":
            await runtime.orchestrator.run_session(args.session_id)
            state, steps = await runtime.store.load(args.session_id)
        else:
            state, steps = await runtime.store.load(args.session_id)
        _print_session(state, steps)
        if args.strict and state.status != "completed":
            return 1
        return 0  # the session reached an outcome (a failed session is a result, not a crash of the runtime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a task to completion")
    run.add_argument("task")
    run.add_argument("--agent", default="assistant")
    run.add_argument("--tenant", default="default")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless the session completed")
    for name in ("resume", "show"):
        cmd = sub.add_parser(name)
        cmd.add_argument("session_id")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
