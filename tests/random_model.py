"""Settings for runtimes that serve a random checkpoint in tests.

A random model's strings and arrays never end by themselves: under structured decoding it writes one string
until the step's token limit cuts the reply, and every action fails to parse. The runtime's defaults set no
bound of their own (a real model ends its strings; a bound would cut its answers), so tests that serve a
random checkpoint bound them, as an operator would for a very weak model.
"""

RANDOM_MODEL_BOUNDS = {"max_action_string_chars": 48, "max_action_items": 8}
RANDOM_MODEL_ENV = {f"ENGRAM_{name.upper()}": str(value) for name, value in RANDOM_MODEL_BOUNDS.items()}
