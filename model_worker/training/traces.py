"""Synthetic agent traces in the exact prompt format the orchestrator renders, for training the demo model.

Each trace is one session of the built-in `assistant` agent: the task, the memories a step's retrieval
puts in the prompt, the actions (tool calls or a final answer) and the tools' real observations. Every
step's prompt comes from `runtime.prompts.build_messages` with the registry's real tool schemas, and the
calculator's observations from the real calculator, so the text is byte for byte what the runtime
shows the model. A step is one training example: its prompt, and as the target the action JSON the
model must write (`json.dumps`, the form structured decoding produces).

Task kinds (one policy, as a careful agent would follow it):
- remember: "Remember that Alice's home city is Lisbon." -> memory_write the fact -> "Noted: ...".
- recall: "What is Alice's home city?" -> answer from the retrieved-memory block when a memory there
  states it; otherwise memory_search, then answer by copying the hit, or say there is no such memory.
- arithmetic: calculator -> "17 times 23 is 391."; with "Remember the result." it also memory_writes
  the sentence before answering. Asking later for "the result of 17 times 23" is a recall.

Retrieval is simulated (`retrieval.py`: word overlap with a little noise by default, or the runtime's own
embedder; top k like the agent's settings) over a store of prior memories that holds hard negatives: the
same person with another attribute, another person with the same attribute, and the episode summaries the
runtime writes when a session ends. Subjects and values come from `pools`, split so that held-out traces
use names and facts no training trace has.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from model_worker.training import pools
from model_worker.training.retrieval import WORD_OVERLAP, MixedRetrieval, Retrieval
from runtime.agents import DEFAULT_AGENT
from runtime.prompts import build_messages, session_summary
from runtime.tools.builtins import builtin_tools
from runtime.tools.calculator import calculate
from runtime.tools.registry import ToolRegistry

AGENT = DEFAULT_AGENT
TOOL_SCHEMAS = ToolRegistry(builtin_tools()).schemas(AGENT.tools)
RETRIEVE_K = AGENT.memory.k
SEARCH_K = 5  # memory_search's default k
KINDS = ("remember", "recall", "recall_search", "refusal", "arithmetic", "arithmetic_remember", "recall_result",
         "recall_cautious")
KIND_WEIGHTS = (0.2, 0.2, 0.12, 0.1, 0.16, 0.12, 0.1, 0.0)  # recall_cautious: 0 keeps earlier runs' draws

REMEMBER_PHRASES = ("Remember that {s}'s {a} is {v}.", "Please note that {s}'s {a} is {v}.",
                    "Save this: {s}'s {a} is {v}.", "Keep in mind: {s}'s {a} is {v}.",
                    "Remember: the {a} of {s} is {v}.", "FYI, {s}'s {a} is {v}. Remember it.",
                    "Please remember that {s}'s {a} is {v}.")
RECALL_PHRASES = ("What is {k}?", "What was {k} again?", "Do you remember {k}?", "Tell me {k}.",
                  "What's {k}?", "Can you recall {k}?", "Look up {k}.")
RESULT_RECALL_PHRASES = ("What was the result of {k}?", "Do you remember the result of {k}?",
                         "What did you save for {k}?", "Recall the result of {k}.",
                         "What was {k}? You saved it earlier.")
COMPUTE_PHRASES = ("What is {k}?", "Compute {k}.", "Calculate {k}.", "How much is {k}?",
                   "Use the calculator: {k}", "What do you get for {k}?")
REMEMBER_SUFFIXES = (" Remember the result.", " Save the result to memory.", " Then remember it.",
                     " Please remember the answer.", " Remember the answer.")
OPERATORS = {"+": ("plus",), "-": ("minus",), "*": ("times", "multiplied by"), "/": ("divided by",)}


@dataclass(frozen=True)
class Fact:
    """Something the agent can remember: `key` is what a question names, `sentence` what is stored."""

    key: str  # "Alice's home city" / "17 times 23"
    value: str

    @property
    def sentence(self) -> str:
        return f"{self.key} is {self.value}."


@dataclass
class Example:
    """One model call: the chat messages of the step and the action JSON the model should answer with."""

    messages: list[dict[str, str]]
    target: str
    kind: str
    labelled_from: int = 0  # the first assistant turn (0: the task's first action) a sequence of it trains on


@dataclass(frozen=True)
class AnswerForms:
    """How the answer after a memory search is worded: a found fact opens with `found_prefix` ("From memory: ";
    "": the bare sentence), and nothing found is `refusal` with the asked key in it. The default refusal opens
    with "I", so the two answers part at the first token, before the key; a refusal that opens with the key
    ("{key}: I have no memory of it.") makes the model write the key first, and the two then part right after
    it, where the model copies what follows that key in the hits or finds no hit to copy from."""

    found_prefix: str = ""
    refusal: str = "I have no memory of {key}."

    def __post_init__(self):
        if "{key}" not in self.refusal or "no memory" not in self.refusal:
            raise ValueError(f"refusal: expected a text holding '{{key}}' and 'no memory' (what the evaluation "
                             f"scores a refusal by), got {self.refusal!r}")
        try:
            self.refusal.format(key="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"refusal: {self.refusal!r} is not a text with one '{{key}}' field ({exc})") from None

    def found(self, sentence: str) -> str:
        return self.found_prefix + sentence

    def not_found(self, key: str) -> str:
        return self.refusal.format(key=key)

    def refused_key(self, answer: str) -> str | None:
        """The key a refusal worded this way names ("I have no memory of Ann's job." -> "Ann's job"), else None."""
        before, after = self.refusal.split("{key}", 1)
        if len(answer) > len(before) + len(after) and answer.startswith(before) and answer.endswith(after):
            return answer[len(before):len(answer) - len(after)]
        return None


DEFAULT_ANSWERS = AnswerForms()  # the wording of every run before --found-prefix and --refusal


@dataclass
class Memory:
    id: str
    kind: str
    text: str


@dataclass
class _Session:
    """Drives one simulated session: retrieval per step, tool results, the examples it yields."""

    task: str
    kind: str
    store: list[Memory]
    rng: random.Random
    hidden: set[str] = field(default_factory=set)  # memory ids retrieval misses (search still finds them)
    retrieval: Retrieval = WORD_OVERLAP
    steps: list[dict[str, Any]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    _block: tuple[int, list[dict[str, Any]]] | None = None

    def _query(self) -> str:
        """What the orchestrator's retrieval queries with: the task and the last observation (as its str)."""
        if self.steps and self.steps[-1]["observations"]:
            return f"{self.task}\n{self.steps[-1]['observations'][-1]}"[:4000]
        return self.task

    def _call_key(self, index: int, call_index: int) -> str:
        """The idempotency key the runtime gives a call (session id:step:call; it is part of the observation
        the next step's retrieval queries with); the session id comes from the task's hash, not the rng."""
        if not self.retrieval.refinds_later:
            return f"s:{index}:{call_index}"  # the key of earlier runs' data
        digest = hashlib.blake2b(f"{self.kind}\n{self.task}".encode(), digest_size=16).digest()
        return f"{uuid.UUID(bytes=digest, version=4)}:{index}:{call_index}"

    def block(self) -> list[dict[str, Any]]:
        """The memories this step's retrieval puts in the prompt (drawn once per step)."""
        if self._block is None or self._block[0] != len(self.steps):
            missed = self.hidden if not (self.steps and self.retrieval.refinds_later) else set()
            visible = [m for m in self.store if m.id not in missed]
            self._block = (len(self.steps), self.retrieval.ranked(visible, self._query(), RETRIEVE_K, self.rng))
        return self._block[1]

    def act(self, action: dict[str, Any]) -> list[dict[str, Any]]:
        """Record the example for this step, run its tool calls; returns their results."""
        messages = build_messages(AGENT, self.task, self.steps, self.block(), TOOL_SCHEMAS)
        self.examples.append(Example(messages, json.dumps(action, ensure_ascii=False), self.kind))
        if action["type"] == "final":
            return []
        index = len(self.steps)
        observations, results = [], []
        for i, call in enumerate(action["calls"]):
            result = self._run_tool(call["name"], call["arguments"])
            results.append(result)
            observations.append({"call_index": i, "tool": call["name"], "arguments": call["arguments"],
                                 "idempotency_key": self._call_key(index, i), "result": result})
        self.steps.append({"index": index, "kind": "action", "action": action, "observations": observations})
        return results

    def _run_tool(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "calculator":
            return calculate(args["expression"])
        if name == "memory_write":
            memory = Memory(new_id(self.rng), "fact", args["text"])
            self.store.append(memory)
            return {"id": memory.id, "kind": memory.kind, "text": memory.text}
        if name == "memory_search":
            return {"hits": self.retrieval.ranked(self.store, args["query"], SEARCH_K, self.rng)}
        raise ValueError(f"no simulated tool {name!r}")


def new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _near_name(name: str, rng: random.Random) -> str:
    """A different name that shares most of `name`'s letters ("Lena" -> "Lenra", "Dratar" -> "Drata")."""
    while True:
        cut = rng.randint(max(1, len(name) - 3), len(name))
        near = (name[:cut] + rng.choice(pools.SYLLABLES) + name[cut + 1:]) if rng.random() < 0.6 else name[:cut]
        if len(near) > 1 and near != name:
            return near


def final(answer: str) -> dict[str, Any]:
    return {"type": "final", "answer": answer}


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "tool_calls", "calls": [{"name": name, "arguments": arguments}]}


class TraceGenerator:
    """Draws traces for one split (training or held-out); deterministic in the seed."""

    def __init__(self, seed: int, held_out: bool = False, weights: tuple[float, ...] = KIND_WEIGHTS,
                 pieces: pools.WordPieces | None = None, retrieval: Retrieval | MixedRetrieval = WORD_OVERLAP,
                 same_form_results: float = 0.0, saved_results: float = 0.0, answers: AnswerForms = DEFAULT_ANSWERS):
        if len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights: expected {len(KINDS)} non-negative weights (one per kind of {KINDS})")
        self.rng = random.Random(seed)
        self.held_out = held_out
        self.weights = tuple(weights)
        self.subject = pools.subject_sampler(held_out, pieces)
        self.attributes = pools.attribute_values(held_out, pieces)
        self.retrieval = retrieval  # how the sessions' memory blocks and searches rank memories
        # share of arithmetic sessions whose store holds a saved result of the same form (see _arithmetic)
        self.same_form_results = same_form_results
        # share of remember and question sessions whose store holds a computed and saved result as the runtime
        # leaves it (the written result and its session's summary), as after the quickstart (see _with_saved_result)
        self.saved_results = saved_results
        # how the answer after a search is worded, found or not (the default: the wording of earlier runs)
        self.answers = answers

    def session_retrieval(self) -> Retrieval:
        """How the next session ranks memories: the generator's retrieval, or one drawn from a mixture."""
        draw = getattr(self.retrieval, "for_session", None)
        return draw(self.rng) if draw is not None else self.retrieval

    # ---- facts and questions ----------------------------------------------------------------------
    def person_fact(self, subject: str | None = None, attribute: str | None = None) -> Fact:
        subject = subject or self.subject(self.rng)
        attribute = attribute or self.rng.choice(list(self.attributes))
        return Fact(f"{subject}'s {attribute}", self.attributes[attribute](self.rng))

    def arithmetic(self) -> tuple[str, str, str]:
        """(key as the question words it, expression, result as the calculator's JSON shows it)."""
        rng = self.rng
        if rng.random() < 0.15:
            a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
            inner = rng.choice("+-")
            expression = f"({a} {inner} {b}) * {c}"
            key = expression
        else:
            op = rng.choice("+-*/")
            if op == "*":
                a, b = rng.randint(2, 99), rng.randint(2, 999)
            elif op == "/":
                b = rng.choice((2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 20, 25))
                a = b * rng.randint(2, 300)
                if b in (2, 4, 5, 8, 10, 20, 25) and rng.random() < 0.3:
                    a += rng.choice((1, 3))  # a short decimal result
            else:
                a, b = rng.randint(2, 9999), rng.randint(2, 999)
            expression = f"{a} {op} {b}"
            word = op if rng.random() < 0.3 else rng.choice(OPERATORS[op])
            key = f"{a} {word} {b}"
        result = json.dumps(calculate(expression)["result"])
        return key, expression, result

    def same_form(self, key: str, expression: str) -> tuple[str, str, str]:
        """Another computation worded as `key` is ("12 times 11" -> "17 times 23"): other numbers, the same
        operator words; (key, expression, result) as `arithmetic` gives them. What a user's memory holds after
        the quickstart when the next question is another product."""
        old = [int(n) for n in re.findall(r"\d+", expression)]
        new = [self.rng.randint(max(2, n // 2), min(9999, max(9, n + n // 2))) for n in old]  # about as large
        if "/" in expression:  # keep the divisor, and a quotient of the usual size
            new[-1] = old[-1]
            new[0] = old[-1] * self.rng.randint(2, 300)
        if new == old:
            new[0] += 1

        def renumber(text: str) -> str:
            numbers = iter(new)
            return re.sub(r"\d+", lambda _: str(next(numbers)), text)

        other = renumber(expression)
        return renumber(key), other, json.dumps(calculate(other)["result"])

    def arithmetic_fact(self) -> Fact:
        key, _, result = self.arithmetic()
        return Fact(key, result)

    def prior_store(self, avoid: Fact | None) -> list[Memory]:
        """Memories from earlier sessions: facts (hard negatives near `avoid`), results, episode summaries."""
        rng, store = self.rng, []
        subject = avoid.key.split("'s ")[0] if avoid and "'s " in avoid.key else None
        attribute = avoid.key.split("'s ", 1)[1] if avoid and "'s " in avoid.key else None
        for _ in range(rng.choice((0, 1, 2, 3, 4, 5, 6, 8))):
            roll = rng.random()
            if roll < 0.25 and subject:
                fact = self.person_fact(subject=subject)
            elif roll < 0.45 and attribute:
                fact = self.person_fact(attribute=attribute)
            elif roll < 0.6:
                fact = self.arithmetic_fact()
            else:
                fact = self.person_fact()
            if avoid and fact.key == avoid.key:
                continue
            if rng.random() < 0.3:  # a session summary (not storing_summary: these draws fix the evaluation sets)
                task = rng.choice(REMEMBER_PHRASES).format(s=fact.key.split("'s ")[0],
                                                           a=fact.key.split("'s ", 1)[-1], v=fact.value) \
                    if "'s " in fact.key else f"What is {fact.key}?{rng.choice(REMEMBER_SUFFIXES)}"
                text = session_summary(task, 2, f"Noted: {fact.sentence}")
                store.append(Memory(new_id(rng), "episode", text))
            else:
                store.append(Memory(new_id(rng), "fact", fact.sentence))
        rng.shuffle(store)
        return store

    def storing_summary(self, fact: Fact) -> Memory:
        """The episode summary the orchestrator writes when the session that stored `fact` ends: "Task: <the
        request>\nOutcome after N steps: <its answer>" (remember: 2 steps; a result kept: 3)."""
        rng = self.rng
        if "'s " in fact.key:
            subject, attribute = fact.key.split("'s ", 1)
            task = rng.choice(REMEMBER_PHRASES).format(s=subject, a=attribute, v=fact.value)
            text = session_summary(task, 2, f"Noted: {fact.sentence}")
        else:
            task = rng.choice(COMPUTE_PHRASES).format(k=fact.key) + rng.choice(REMEMBER_SUFFIXES)
            text = session_summary(task, 3, f"{fact.sentence} I saved it to memory.")
        return Memory(new_id(rng), "episode", text)

    def stored_memories(self, fact: Fact, summary_only: bool = False) -> list[Memory]:
        """What storing `fact` leaves in the memory store, as in the runtime: the written fact and, mostly, the
        summary of the session that wrote it (both hold the sentence); sometimes only one of them."""
        written = Memory(new_id(self.rng), "fact", fact.sentence)
        if summary_only:
            return [self.storing_summary(fact)]
        return [written, self.storing_summary(fact)] if self.rng.random() < 0.8 else [written]

    # ---- sessions ---------------------------------------------------------------------------------
    def session(self, kind: str | None = None) -> list[Example]:
        """One session's examples (one per step) of the given kind, or of a kind drawn by the weights."""
        kind = kind or self.rng.choices(KINDS, self.weights)[0]
        return getattr(self, f"_{kind}")(kind)

    def _with_saved_result(self, store: list[Memory]) -> list[Memory]:
        """`store`, and in `saved_results` of the sessions also a product computed and saved by an earlier session
        ("17 times 23 is 391." and that session's summary, as `make demo` leaves them), placed at random."""
        if not self.saved_results or self.rng.random() >= self.saved_results:
            return store
        a, b = self.rng.randint(11, 99), self.rng.randint(11, 99)
        store = list(store)
        for memory in self.stored_memories(Fact(f"{a} times {b}", str(a * b))):
            store.insert(self.rng.randrange(len(store) + 1), memory)
        return store

    def _remember(self, kind: str) -> list[Example]:
        fact = self.person_fact()
        subject, attribute = fact.key.split("'s ", 1)
        task = self.rng.choice(REMEMBER_PHRASES).format(s=subject, a=attribute, v=fact.value)
        s = _Session(task, kind, self._with_saved_result(self.prior_store(fact)), self.rng,
                     retrieval=self.session_retrieval())
        s.act(call("memory_write", text=fact.sentence))
        s.act(final(f"Noted: {fact.sentence}"))
        return s.examples

    def _recall_from(self, kind: str, fact: Fact, phrases: tuple[str, ...], *, stored: bool,
                     in_block: bool, store: list[Memory] | None = None, cautious: bool = False) -> list[Example]:
        """A question's session; `cautious`: it searches even when the block holds the fact (a step a model
        may take; only what follows it is for training)."""
        store = self._with_saved_result(self.prior_store(fact)) if store is None else list(store)
        task = self.rng.choice(phrases).format(k=fact.key)
        targets = self.stored_memories(fact, summary_only=self.rng.random() < 0.1) if stored else []
        for target in targets:
            store.insert(self.rng.randrange(len(store) + 1), target)
        s = _Session(task, kind, store, self.rng, hidden=set() if in_block else {t.id for t in targets},
                     retrieval=self.session_retrieval())
        if cautious or not any(fact.sentence in memory["text"] for memory in s.block()):
            results = s.act(call("memory_search", query=fact.key))
            found = any(fact.sentence in hit["text"] for hit in results[0]["hits"])
            s.act(final(self.answers.found(fact.sentence) if found else self.answers.not_found(fact.key)))
            return s.examples
        s.act(final(fact.sentence))
        return s.examples

    def _recall(self, kind: str) -> list[Example]:
        return self._recall_from(kind, self.person_fact(), RECALL_PHRASES, stored=True, in_block=True)

    def _recall_search(self, kind: str) -> list[Example]:
        return self._recall_from(kind, self.person_fact(), RECALL_PHRASES, stored=True, in_block=False)

    def _recall_cautious(self, kind: str) -> list[Example]:
        """The block holds the fact, the model searched anyway (as it may): only the answer from the hits, where
        the fact shows twice (the written memory and its session's summary), is for training."""
        fact, phrases = (self.arithmetic_fact(), RESULT_RECALL_PHRASES) if self.rng.random() < 0.3 \
            else (self.person_fact(), RECALL_PHRASES)
        steps = self._recall_from(kind, fact, phrases, stored=True, in_block=True, cautious=True)
        for step in steps:
            step.labelled_from = len(steps) - 1
        return steps

    def _refusal(self, kind: str) -> list[Example]:
        fact = self.person_fact()
        phrases = RECALL_PHRASES
        if self.rng.random() < 0.3:
            fact, phrases = self.arithmetic_fact(), RESULT_RECALL_PHRASES
        return self._recall_from(kind, fact, phrases, stored=False, in_block=False)

    def _recall_result(self, kind: str) -> list[Example]:
        return self._recall_from(kind, self.arithmetic_fact(), RESULT_RECALL_PHRASES, stored=True,
                                 in_block=self.rng.random() < 0.75)

    # ---- minimal sets for the one decision a question needs -------------------------------------------
    def hard_negatives(self, fact: Fact) -> list[Memory]:
        """Memories a careless reader takes for `fact`: other people's same attribute (one with a name that
        differs by a piece), the same person's other attributes; for a result, other results."""
        rng, out = self.rng, []
        if "'s " not in fact.key:
            out.extend(self.arithmetic_fact() for _ in range(rng.randint(1, 2)))
        else:
            subject, attribute = fact.key.split("'s ", 1)
            for _ in range(rng.randint(1, 2)):
                out.append(self.person_fact(attribute=attribute))
            if rng.random() < 0.7:
                out.append(self.person_fact(subject=subject))
            if rng.random() < 0.4:
                out.append(self.person_fact(subject=_near_name(subject, rng), attribute=attribute))
        return [Memory(new_id(rng), "fact", f.sentence) for f in out if f.key != fact.key]

    def question_group(self) -> list[list[Example]]:
        """One question over one store of hard negatives, four ways: the fact is in the memory block (answer
        directly; or, cautious, search anyway and answer from the hits), stored but not retrieved (search, then
        answer), never stored (search, then say so). Trained side by side, only whether the block (or the
        hits) name this very person and attribute tells them apart: the check a model otherwise skips,
        answering from any memory about the attribute."""
        kind = "question_group"
        if self.rng.random() < 0.2:
            fact, phrases = self.arithmetic_fact(), RESULT_RECALL_PHRASES
        else:
            fact, phrases = self.person_fact(), RECALL_PHRASES
        store = self.prior_store(fact) + self.hard_negatives(fact)
        self.rng.shuffle(store)
        return [self._recall_from(kind, fact, phrases, stored=stored, in_block=in_block, store=store, cautious=cautious)
                for stored, in_block, cautious in ((True, True, False), (True, True, True), (True, False, False),
                                                   (False, False, False))]

    def _arithmetic(self, kind: str, remember: bool = False) -> list[Example]:
        key, expression, _ = self.arithmetic()
        task = self.rng.choice(COMPUTE_PHRASES).format(k=key)
        if remember:
            task += self.rng.choice(REMEMBER_SUFFIXES)
        store = self.prior_store(None)
        if self.same_form_results and self.rng.random() < self.same_form_results:
            # as after the quickstart: "17 times 23 is 391." and its session's summary are in memory, and the
            # question is another product; the calculator answers it, not the memory of a look-alike
            other_key, _, other_result = self.same_form(key, expression)
            for memory in self.stored_memories(Fact(other_key, other_result)):
                store.insert(self.rng.randrange(len(store) + 1), memory)
        s = _Session(task, kind, store, self.rng, retrieval=self.session_retrieval())
        result = json.dumps(s.act(call("calculator", expression=expression))[0]["result"])
        sentence = Fact(key, result).sentence
        if remember:
            s.act(call("memory_write", text=sentence))
            s.act(final(f"{sentence} I saved it to memory."))
        else:
            s.act(final(sentence))
        return s.examples

    def _arithmetic_remember(self, kind: str) -> list[Example]:
        return self._arithmetic(kind, remember=True)


def examples(count: int, seed: int, held_out: bool = False) -> list[Example]:
    """At least `count` examples from whole sessions of a generator with this seed."""
    generator = TraceGenerator(seed, held_out)
    out: list[Example] = []
    while len(out) < count:
        out.extend(generator.session())
    return out
