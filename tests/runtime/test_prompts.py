"""Prompts and actions: the action schema is valid JSON Schema that accepts exactly the valid actions (checked with
`jsonschema`), compiles with xgrammar, and random-logit generation under it always yields actions `parse_action`
accepts; `parse_action` agrees with the schema and names what is wrong; `build_messages` renders through the demo
tokenizer's chat template with every part in its place."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import pytest
import torch

from model_worker.demo_tokenizer import build_demo_tokenizer
from model_worker.engine.sampling import Sampler, SamplingParams, make_generator
from model_worker.engine.structured import GrammarBackend
from runtime.agents import AgentDefinition
from runtime.prompts import (
    MAX_ECHO_CHARS,
    ActionParseError,
    action_schema,
    build_messages,
    estimate_tokens,
    memory_dicts,
    parse_action,
    repair_prompt,
)
from runtime.tools import ToolRegistry, builtin_tools

TOOLS = ["calculator", "memory_write", "memory_search", "current_time"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tokenizer"))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, tokenizer.vocab_size)


@pytest.fixture(scope="module")
def schemas():
    return ToolRegistry(builtin_tools()).schemas(TOOLS)


def calc(expression: str) -> dict:
    return {"name": "calculator", "arguments": {"expression": expression}}


# --- the schema ----------------------------------------------------------------------------------


def test_action_schema_accepts_valid_actions_and_rejects_invalid_ones(schemas):
    schema = action_schema(schemas, max_calls=2)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    valid = [
        {"type": "final", "answer": "42"},
        {"type": "final", "answer": ""},
        {"type": "tool_calls", "calls": [calc("1+1")]},
        {"type": "tool_calls", "calls": [calc("1+1"), {"name": "memory_write",
                                                       "arguments": {"text": "x", "kind": "episode"}}]},
        {"type": "tool_calls", "calls": [{"name": "current_time", "arguments": {}}]},
    ]
    invalid = [
        {"type": "final"},
        {"type": "final", "answer": 42},
        {"type": "final", "answer": "a", "thought": "extra key"},
        {"type": "done", "answer": "a"},
        {"answer": "a"},
        {"type": "tool_calls", "calls": []},
        {"type": "tool_calls", "calls": [calc("1"), calc("2"), calc("3")]},  # more than max_calls
        {"type": "tool_calls", "calls": [{"name": "shell", "arguments": {}}]},
        {"type": "tool_calls", "calls": [{"name": "calculator", "arguments": {}}]},  # missing expression
        {"type": "tool_calls", "calls": [{"name": "calculator", "arguments": {"expression": 3}}]},
        {"type": "tool_calls", "calls": [{"name": "calculator", "arguments": {"expression": "1", "x": 1}}]},
        {"type": "tool_calls", "calls": [{"name": "memory_write", "arguments": {"text": "x", "kind": "summary"}}]},
        {"type": "tool_calls", "calls": [{**calc("1"), "id": "call_1"}]},
        {"type": "tool_calls", "calls": [calc("1")], "answer": "both"},
    ]
    for action in valid:
        assert validator.is_valid(action), action
    for action in invalid:
        assert not validator.is_valid(action), action


def test_without_tools_only_a_final_answer_is_allowed():
    validator = jsonschema.Draft202012Validator(action_schema([]))
    assert validator.is_valid({"type": "final", "answer": "ok"})
    assert not validator.is_valid({"type": "tool_calls", "calls": [calc("1")]})
    with pytest.raises(ActionParseError, match="no tools are available"):
        parse_action('{"type": "tool_calls", "calls": []}', [])


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ([{"name": "a"}], {}, r"tool_schemas\[0\] must be a dict with 'name'"),
    ([{"name": "a", "parameters": {}}, {"name": "a", "parameters": {}}], {}, "duplicate tool names a"),
    ([], {"max_calls": 0}, "max_calls must be a positive int"),
])
def test_action_schema_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        action_schema(args, **kwargs)


def _generate(tokenizer, backend, grammar, seed: int, max_steps: int = 600) -> str:
    """Constrained generation from random (peaky) logits; returns the decoded text once the grammar ends."""
    state = backend.matcher(grammar)
    logits_source = torch.Generator().manual_seed(seed)
    params, generator = SamplingParams(temperature=1.0, seed=seed), make_generator(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(backend.vocab_size, generator=logits_source) * 3.0
        state.fill_mask(logits)
        token = Sampler()(logits[None], [params], [generator]).token_ids[0]
        state.accept(token)
        if state.is_terminated():
            return tokenizer.decode(ids)
        ids.append(token)
    raise AssertionError(f"seed {seed}: the grammar did not end within {max_steps} tokens")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_random_logit_generation_under_the_action_grammar_always_parses(tokenizer, backend, schemas):
    """The bounded schema compiles with xgrammar; every output is an action the unbounded schema and parse_action
    both accept, and no string is longer than the bound."""
    bound = 24
    unbounded = jsonschema.Draft202012Validator(action_schema(schemas, max_calls=3))
    grammar = backend.compile(json_schema=action_schema(schemas, max_calls=3, max_string_chars=bound, max_items=3))
    kinds, tools_called = set(), set()
    for seed in range(30):
        text = _generate(tokenizer, backend, grammar, seed)
        value = json.loads(text)
        unbounded.validate(value)
        assert parse_action(text, TOOLS, max_calls=3) == value
        assert all(len(s) <= bound for s in _strings(value)), text
        kinds.add(value["type"])
        tools_called.update(call["name"] for call in value.get("calls", []))
    assert kinds == {"final", "tool_calls"} and len(tools_called) >= 3  # really different actions


def test_unbounded_action_schema_compiles_for_every_builtin(backend):
    schemas = ToolRegistry(builtin_tools()).schemas()
    backend.compile(json_schema=action_schema(schemas))


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("", "the output is empty"),
    ("```json\n\n```", "the output is empty"),
    ("Sure! Here is the answer.", "not valid JSON"),
    ('{"type": "final", "answer": "a"} trailing', "not valid JSON \\(Extra data"),
    ('{"type": "final", "answer": NaN}', "NaN is not a JSON number"),
    ("[1, 2]", "expected one JSON object, got a JSON list"),
    ('{"type": "finish", "answer": "a"}', "'type' must be \"tool_calls\" or \"final\", got 'finish'"),
    ('{"answer": "a"}', "'type' must be"),
    ('{"type": "final"}', "a final action is missing 'answer'"),
    ('{"type": "final", "answer": "a", "thought": "t"}', "unexpected key\\(s\\) 'thought'"),
    ('{"type": "final", "answer": ["a"]}', "'answer' must be a string, got list"),
    ('{"type": "tool_calls"}', "a tool_calls action is missing 'calls'"),
    ('{"type": "tool_calls", "calls": []}', "'calls' must be a non-empty list"),
    ('{"type": "tool_calls", "calls": {"name": "calculator"}}', "'calls' must be a non-empty list"),
    ('{"type": "tool_calls", "calls": ["calculator"]}', r"calls\[0\] must be an object"),
    ('{"type": "tool_calls", "calls": [{"name": "calculator"}]}', r"calls\[0\] is missing 'arguments'"),
    ('{"type": "tool_calls", "calls": [{"name": "shell", "arguments": {}}]}',
     r"calls\[0\].name 'shell' is not an available tool \(available: calculator, memory_write"),
    ('{"type": "tool_calls", "calls": [{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}]}',
     r"calls\[0\].arguments must be a JSON object, got str"),
    ('{"type": "tool_calls", "calls": [' + ", ".join([json.dumps(calc("1"))] * 3) + "]}",
     "has 3 calls; at most 2 are allowed"),
])
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ActionParseError, match=message):
        parse_action(text, TOOLS, max_calls=2)


def test_parse_accepts_fenced_and_padded_json_and_returns_the_canonical_action():
    action = {"type": "tool_calls", "calls": [calc("2 + 2")]}
    for text in (json.dumps(action), f"  {json.dumps(action, indent=2)}\n", f"```json\n{json.dumps(action)}\n```",
                 f"```\n{json.dumps(action)}\n```"):
        assert parse_action(text, TOOLS) == action
    assert isinstance(ActionParseError("x"), ValueError)


def _mutations(rng: random.Random, action: dict) -> dict:
    """A structurally mutated copy of a valid action (some mutations keep it valid)."""
    value = copy.deepcopy(action)
    calls = value.get("calls")
    if not (isinstance(calls, list) and all(isinstance(call, dict) for call in calls)):
        calls = None  # only well-formed call lists get call-level mutations
    choice = rng.randrange(12)
    if choice == 0:
        value.pop(rng.choice(list(value)))
    elif choice == 1:
        value[rng.choice(["thought", "answer", "calls", "id"])] = "x"
    elif choice == 2:
        value["type"] = rng.choice(["final", "tool_calls", "FINAL", "", 1, None, True])
    elif choice == 3:
        value["answer" if "answer" in value else "calls"] = rng.choice([1, None, [], {}, "text", ["a"]])
    elif choice == 4 and calls:
        calls.extend(copy.deepcopy(calls[0]) for _ in range(rng.randint(1, 3)))
    elif choice == 5 and calls:
        calls[rng.randrange(len(calls))]["name"] = rng.choice(TOOLS + ["shell", "", "Calculator"])
    elif choice == 6 and calls:
        calls[rng.randrange(len(calls))]["arguments"] = rng.choice([[], "{}", None, 3, {"any": "object"}])
    elif choice == 7 and calls:
        calls[rng.randrange(len(calls))].pop(rng.choice(["name", "arguments"]), None)
    elif choice == 8 and calls:
        calls[rng.randrange(len(calls))]["extra"] = 1
    elif choice == 9 and calls:
        calls[rng.randrange(len(calls))] = rng.choice(["calculator", 1, None, []])
    elif choice == 10:
        value = rng.choice([[value], "final", 3, None])
    return value


def test_parse_action_accepts_exactly_what_the_schema_accepts():
    """Against tools with free-form arguments (parse_action leaves argument checks to the registry)."""
    free_form = [{"name": name, "description": "", "parameters": {"type": "object"}} for name in TOOLS]
    validator = jsonschema.Draft202012Validator(action_schema(free_form, max_calls=2))
    rng = random.Random(7)
    bases = [{"type": "final", "answer": "done"}, {"type": "tool_calls", "calls": [calc("1")]},
             {"type": "tool_calls", "calls": [calc("1"), {"name": "current_time", "arguments": {}}]}]
    outcomes = []
    for _ in range(600):
        value = _mutations(rng, rng.choice(bases))
        if rng.random() < 0.3:
            value = _mutations(rng, value) if isinstance(value, dict) else value
        try:
            parse_action(json.dumps(value), TOOLS, max_calls=2)
            parsed = True
        except ActionParseError:
            parsed = False
        assert parsed == validator.is_valid(value), value
        outcomes.append(parsed)
    assert 0.15 < sum(outcomes) / len(outcomes) < 0.85  # both sides of the boundary were exercised


def test_repair_prompt_carries_the_error_and_a_bounded_echo(tokenizer):
    message = repair_prompt("not json at all", "the output is not valid JSON (Expecting value at character 0)")
    assert message["role"] == "user"
    assert "Expecting value at character 0" in message["content"] and "not json at all" in message["content"]
    long = repair_prompt("x" * 5000, "too long")
    assert "x" * MAX_ECHO_CHARS + " [...]" in long["content"] and "x" * (MAX_ECHO_CHARS + 1) not in long["content"]
    tokenizer.apply_chat_template([{"role": "user", "content": "task"}, {"role": "assistant", "content": "oops"},
                                   message])


# --- messages ------------------------------------------------------------------------------------


AGENT = AgentDefinition(name="helper", instructions="You are a careful assistant.", tools=["calculator"])


def _step(index: int, kind: str = "action", **fields) -> dict:
    action = fields.pop("action", {"type": "tool_calls", "calls": [calc(f"{index} * 7")]})
    observations = fields.pop("observations", [
        {"call_index": 0, "tool": "calculator", "arguments": {"expression": f"{index} * 7"},
         "result": {"result": index * 7}, "idempotency_key": f"s:{index}:0"}])
    return {"step_id": f"s:{index}", "index": index, "kind": kind, "model_output": None, "action": action,
            "observations": observations, "retrieved_memories": [], "usage": {}, "started_ms": 0,
            "committed_ms": 0, **fields}


def test_build_messages_renders_through_the_chat_template_in_order(tokenizer, schemas):
    tool_schemas = [s for s in schemas if s["name"] == "calculator"]
    steps = [_step(0), _step(1), _step(2, kind="summary", action=None, observations=[], model_output="sum"),
             _step(3), _step(4, action={"type": "tool_calls", "calls": [calc("1/0")]},
                             observations=[{"call_index": 0, "tool": "calculator", "arguments": {},
                                            "error": "ToolError: division by zero", "idempotency_key": "s:4:0"}])]
    memories = [{"id": "m-1", "kind": "fact", "text": "The user prefers exact fractions.", "score": 0.8123}]
    messages = build_messages(AGENT, "What is 3 * 7?", steps, memories, tool_schemas,
                              summary="Steps 0 and 1 computed 0*7 and 1*7.", summarized_through=2)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    system = messages[0]["content"]
    for part in ("You are a careful assistant.", '"type": "final"', "- calculator: Evaluate an arithmetic",
                 json.dumps(tool_schemas[0]["parameters"]), "[fact, score 0.81, id m-1] The user prefers exact",
                 "(steps 0 to 1)\nSteps 0 and 1 computed"):
        assert part in system, part
    assert json.loads(messages[2]["content"]) == steps[3]["action"]
    assert json.loads(messages[3]["content"]) == [{"call_index": 0, "tool": "calculator", "result": {"result": 21}}]
    assert json.loads(messages[5]["content"])[0]["error"] == "ToolError: division by zero"
    rendered = tokenizer.apply_chat_template(messages)
    pieces = [tokenizer.bos_token + "You are a careful assistant.", "<|User|>What is 3 * 7?",
              "<|Assistant|>" + messages[2]["content"] + tokenizer.eos_token,
              "<tool_output>" + messages[3]["content"] + "</tool_output>",
              "<|Assistant|>" + messages[4]["content"] + tokenizer.eos_token]
    positions = [rendered.index(piece) for piece in pieces]
    assert positions == sorted(positions) and rendered.endswith("<|Assistant|>")
    assert '"3 * 7"' in rendered and '"0 * 7"' not in rendered and '"1 * 7"' not in rendered  # folded steps
    assert '"2 * 7"' not in rendered  # the summary step itself is not replayed


def test_build_messages_accepts_step_models_and_hits(tokenizer):
    models = pytest.importorskip("runtime.sessions.models")
    from memory_service.agent_memory import MemoryHit, MemoryRecord

    step = models.Step.model_validate(_step(0))
    record = MemoryRecord(id="m-2", tenant="t", agent="helper", kind="episode", text="Met the client.", metadata={},
                          source_session=None, source_step=None, created_at=None, updated_at=None,
                          idempotency_key=None)
    memories = memory_dicts([MemoryHit(memory=record, score=0.5)])
    assert memories == [{"id": "m-2", "kind": "episode", "text": "Met the client.", "score": 0.5}]
    messages = build_messages(AGENT, "task", [step], memories, [])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert "## Tools" not in messages[0]["content"] and "Met the client." in messages[0]["content"]
    assert '"tool_calls"' not in messages[0]["content"]  # no tools: only the final format is described
    tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"task": ""}, ValueError, "task must be a non-empty str"),
    ({"summarized_through": -1}, ValueError, "summarized_through must be an int >= 0"),
    ({"steps": [3]}, TypeError, r"steps\[0\] must be a Step or a dict"),
    ({"memories": [{"kind": "fact"}]}, ValueError, r"memories\[0\] must be a dict with a 'text' str"),
    ({"agent": {"name": "x"}}, TypeError, "agent must be an AgentDefinition"),
])
def test_build_messages_rejects_bad_input(kwargs, error, message):
    arguments = {"agent": AGENT, "task": "t", "steps": [], "memories": [], "tool_schemas": [], **kwargs}
    with pytest.raises(error, match=message):
        build_messages(**arguments)


def test_estimate_tokens_counts_the_rendered_prompt(tokenizer, schemas):
    messages = build_messages(AGENT, "What is 3 * 7?", [_step(0)], [], schemas[:1])
    exact = estimate_tokens(messages, tokenizer)
    # the engine's prompt: the chat template rendered with the generation prompt, encoded without extra BOS
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)
    assert exact == len(ids)
    longer = estimate_tokens([*messages, {"role": "user", "content": "and now 4 * 7?"}], tokenizer)
    assert longer > exact
    rough = estimate_tokens(messages)
    assert exact / 3 < rough < exact * 3  # the tokenizer-free estimate is in the right range
