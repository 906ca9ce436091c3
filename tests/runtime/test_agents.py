"""Agent definitions: the documented defaults, a lossless JSON round trip, refusal of bad values with a ValueError
naming the field, and the check that an agent's tools are registered."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime.agents import AgentDefinition, AgentLimits, MemorySettings
from runtime.tools import ToolRegistry, builtin_tools


def test_defaults_are_the_documented_ones():
    agent = AgentDefinition(name="helper", instructions="Help.")
    assert (agent.model, agent.tools) == ("default", [])
    assert agent.memory == MemorySettings(retrieve=True, k=5, kinds=None, min_score=None, write_summary=True)
    assert agent.limits.model_dump() == {"max_steps": 20, "max_tokens_per_step": 256, "max_total_tokens": 100_000,
                                         "max_wall_time_s": 600.0, "max_parse_repairs": 2,
                                         "max_tool_calls_per_step": 4, "max_tool_result_chars": 8000,
                                         "tool_timeout_s": 60.0}


def test_json_round_trip_is_lossless():
    agent = AgentDefinition(
        name="research-bot_2", instructions="Find things.\nCite them.", model="deepseek-tiny",
        tools=["memory_search", "calculator"],
        memory=MemorySettings(k=8, kinds=["fact", "summary"], min_score=0.25, write_summary=False),
        limits=AgentLimits(max_steps=50, max_parse_repairs=0, max_wall_time_s=12.5))
    assert AgentDefinition.model_validate_json(agent.model_dump_json()) == agent
    assert AgentDefinition.model_validate(agent.model_dump()) == agent


@pytest.mark.parametrize(("fields", "location"), [
    ({"name": "Helper"}, "name"),
    ({"name": "my agent"}, "name"),
    ({"name": "-x"}, "name"),
    ({"name": "a" * 65}, "name"),
    ({"instructions": ""}, "instructions"),
    ({"instructions": "   \n"}, "instructions"),
    ({"model": ""}, "model"),
    ({"tools": ["calculator", "calculator"]}, "tools"),
    ({"tools": ["rm -rf"]}, "tools"),
    ({"memory": {"k": 0}}, "memory.k"),
    ({"memory": {"kinds": ["secret"]}}, "memory.kinds.0"),
    ({"memory": {"min_score": 2.0}}, "memory.min_score"),
    ({"memory": {"topk": 3}}, "memory.topk"),
    ({"limits": {"max_steps": 0}}, "limits.max_steps"),
    ({"limits": {"max_parse_repairs": -1}}, "limits.max_parse_repairs"),
    ({"limits": {"max_wall_time_s": float("inf")}}, "limits.max_wall_time_s"),
    ({"limits": {"max_tool_calls_per_step": 0}}, "limits.max_tool_calls_per_step"),
    ({"temperature": 0.3}, "temperature"),
])
def test_bad_values_raise_a_value_error_naming_the_field(fields, location):
    with pytest.raises(ValidationError) as info:
        AgentDefinition.model_validate({"name": "helper", "instructions": "Help.", **fields})
    assert isinstance(info.value, ValueError)
    locations = [".".join(str(p) for p in error["loc"]) for error in info.value.errors()]
    assert location in locations, locations


def test_check_tools_names_every_unregistered_tool():
    registry = ToolRegistry(builtin_tools())
    AgentDefinition(name="ok", instructions="x", tools=["calculator", "memory_write"]).check_tools(registry.names())
    agent = AgentDefinition(name="needs-more", instructions="x", tools=["calculator", "web_search", "shell"])
    with pytest.raises(ValueError, match="agent 'needs-more': tools not registered: web_search, shell"):
        agent.check_tools(registry.names())
