"""Per-request sampling settings and the batched sampler that turns a step's logits into tokens.

`SamplingParams` is the validated description of how one request picks its tokens (greedy or
temperature / top-k / top-p, seed, stop conditions, logprobs, an optional grammar). `Sampler` picks one
token per row of a step's logits, every row by its own settings and its own random generator, so a
seeded request draws the same tokens alone or batched with any others.

How a row is sampled (temperature > 0): divide by the temperature, keep the top-k logits, then keep
the smallest set of the most likely tokens whose probability (after top-k) reaches top_p, and draw from
the renormalised rest. The draw is an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) drawn from
the row's generator, which picks i with probability p_i; each seeded row draws its own V noise values,
so other rows never shift its random stream.

It deliberately does not: apply grammar masks (the engine fills them into the logits first, see
`structured.py`), check stop strings or stop tokens (`detokenizer.py` and the engine), or apply
repetition/frequency penalties (not supported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20
# Temperatures below this are treated as greedy (dividing by them would overflow fp32 logits).
GREEDY_TEMPERATURE = 1e-5
_SEED_RANGE = (-(2**63), 2**64 - 1)


class SamplingParams(BaseModel):
    """How one request samples and when it stops. Bad values raise ValueError naming the field.

    Ints are strict (no bools, floats or numeric strings); `stop` also accepts a single string.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0  # 0 = greedy
    top_k: Annotated[int, Field(ge=0)] = 0  # 0 = disabled
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=_SEED_RANGE[0], le=_SEED_RANGE[1])] | None = None
    stop: list[str] = Field(default_factory=list)  # stop strings, cut from the output text
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # chosen token's + top-N
    json_schema: dict[str, Any] | None = None  # constrained decoding; exclusive with regex
    regex: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _one_grammar(self) -> SamplingParams:
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("json_schema and regex are mutually exclusive; give at most one")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` (taken modulo 2**64), or None (use the global RNG) for no seed."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


@dataclass
class SampleResult:
    """One entry per logits row. logprobs / top_logprobs are None for rows that did not ask for them."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits with everything outside each row's top-k, then top-p, nucleus set to -inf.

    logits [n, V] fp32 (already temperature-scaled); top_k int64 [n] (0 = all); top_p fp32 [n] in (0, 1].
    Top-p keeps a token while the probability mass of the more likely tokens (after top-k) is < top_p,
    so the most likely token always survives. Ties are broken by token id (stable sort).
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [n, V]
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    drop = ranks[None, :] >= k[:, None]  # [n, V]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 keeps everything (rounding in the cumsum must not drop the far tail).
    limit = torch.where(top_p < 1.0, top_p, torch.inf)
    drop = drop | (mass_before >= limit[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _exponential_noise(rows: int, vocab: int, generators: list[torch.Generator | None],
                       device: torch.device) -> torch.Tensor:
    """Exp(1) noise [rows, V]: a seeded row draws from its own generator, unseeded rows share the global RNG."""
    noise = torch.empty(rows, vocab, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            row = torch.empty(vocab, device=generator.device).exponential_(generator=generator)
            noise[i] = row.to(device)
    # Exp(1) can round to 0; a floor keeps p / E finite (and 0 / E = 0 for masked tokens).
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def _check_inputs(logits: Any, params: Any, generators: Any) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [N, V] with V >= 1, got {tuple(logits.shape)}")
    rows = logits.shape[0]
    if not isinstance(params, list) or len(params) != rows:
        raise ValueError(f"params must be a list with one SamplingParams per logits row ({rows})")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError("params must hold SamplingParams")
    if not isinstance(generators, list) or len(generators) != rows:
        raise ValueError(f"generators must be a list with one entry (torch.Generator or None) per row ({rows})")
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise TypeError("generators must hold torch.Generator or None")


class Sampler:
    """Picks one token per logits row, each row by its own SamplingParams and generator."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> SampleResult:
        """logits [N, V] (grammar masks already applied as -inf) -> one token id per row.

        Greedy rows (temperature 0) take the argmax and draw no random numbers. Logprobs, when asked
        for, are log_softmax of the logits as given (before temperature, top-k and top-p).
        """
        _check_inputs(logits, params, generators)
        logits = logits.float()
        rows, vocab = logits.shape
        tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            # max(dim) returns the first maximal index like argmax, and is faster on CPU (a third at 16 rows).
            tokens[greedy] = (logits if len(greedy) == rows else logits[greedy]).max(dim=-1).indices
        if sampled:
            tokens[sampled] = self._sample_rows(logits[sampled], [params[i] for i in sampled],
                                                [generators[i] for i in sampled])
        token_list = tokens.tolist()
        chosen_lp: list[float | None] = [None] * rows
        top_lp: list[list[tuple[int, float]] | None] = [None] * rows
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            logprobs = logits[wanted].log_softmax(dim=-1)  # [n, V]
            chosen = logprobs.gather(-1, tokens[wanted, None]).squeeze(-1).tolist()
            widest = min(max(params[i].logprobs for i in wanted), vocab)
            top_values, top_ids = logprobs.topk(widest, dim=-1) if widest else (None, None)
            for j, i in enumerate(wanted):
                chosen_lp[i] = chosen[j]
                n = min(params[i].logprobs, vocab)
                top_lp[i] = list(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist())) if n else []
        return SampleResult(token_list, chosen_lp, top_lp)

    @staticmethod
    def _sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
        """Temperature, top-k, top-p, then one draw per row: logits [n, V] -> token ids int64 [n]."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        scaled = logits / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            scaled = filter_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = _exponential_noise(len(params), logits.shape[1], generators, device)
        return (probs / noise).argmax(dim=-1)
