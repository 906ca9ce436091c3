"""The CLI's event lines (runtime/cli/render.py), as a user reads them: one line per event, counts in words."""

from __future__ import annotations

import io

from runtime.cli.render import EventPrinter
from runtime.resources import TaskEvent


def _printed(*events: TaskEvent) -> list[str]:
    out = io.StringIO()  # not a terminal: no live token counter
    printer = EventPrinter(out)
    for event in events:
        printer.show(event)
    return out.getvalue().splitlines()


def test_recalled_memories_are_counted_in_words_with_their_first_texts():
    one = TaskEvent(id="1-0", type="memory_hits", data={"index": 2, "memories": [{"text": "17 times 23 is 391."}]})
    two = TaskEvent(id="1-1", type="memory_hits", data={"index": 0, "memories": [{"text": "a"}, {"text": "b"}]})
    assert _printed(one, two) == ["  step 2: recalled 1 memory: 17 times 23 is 391.",
                                  "  step 0: recalled 2 memories: a; b"]


def test_a_tool_call_and_its_result_are_one_line_each():
    call = TaskEvent(id="2-0", type="tool_call", data={"index": 0, "tool": "calculator",
                                                       "arguments": {"expression": "17 * 23"}})
    result = TaskEvent(id="2-1", type="tool_result", data={"index": 0, "result": {"result": 391}})
    assert _printed(call, result) == ['  step 0: calculator({"expression": "17 * 23"})',
                                      '  step 0:   -> {"result": 391}']
