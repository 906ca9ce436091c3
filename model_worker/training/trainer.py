"""Train the demo model on synthetic traces: AdamW, warmup + cosine schedule, clipping, resumable.

Engram tables train at their own learning rate (`engram_lr_scale` x the base rate) without weight
decay, as the Engram paper does; norms, biases and mHC/Engram gate vectors get no weight decay either.
Loss is on the assistant's action tokens only. The run opens with `copy_warmup_steps` of pure copying
(`data.copy_batch`) and keeps a small copy batch in every later step: it grows the induction heads that
copying names and numbers out of a prompt needs, which agent traces alone take thousands of steps to grow.
The data stream is a pure function of (seed, step), so a run stopped and resumed from its last checkpoint
sees the same batches as an uninterrupted one. State is saved as safetensors + JSON (no pickles): weights,
optimizer moments, step and the loss history.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model_worker.tokenizer import Tokenizer
from model_worker.training import data, pools
from model_worker.training.forward import batch_loss
from model_worker.training.model_setup import build_trainable, demo_model_config, export_checkpoint, load_exported
from model_worker.training.prefetch import BATCHES_PER_CHUNK, ChunkPrefetcher, chunk_batches, settings_pieces
from model_worker.training.retrieval import WORD_OVERLAP, Retrieval, retrieval_for

PRECISIONS = ("fp32", "bf16")
HELD_OUT_SEED = 4242
QUESTION_SEEDS = 700_001  # question batches' generator seeds start here (the chunks' stay far below it)


@dataclass
class TrainSettings:
    out_dir: Path
    steps: int = 2600
    batch_size: int = 8
    short_batch_size: int = 16  # batches of short-form sessions between the full-form ones (0: none)
    full_every: int = 3  # every full_every-th step is a full-form batch, the others short-form
    lr: float = 3e-3
    engram_lr_scale: float = 5.0
    weight_decay: float = 0.1
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    vocab_size: int = 4096
    tokenizer_examples: int = data.TOKENIZER_CORPUS_EXAMPLES
    eval_every: int = 200
    eval_examples: int = 96
    checkpoint_every: int = 50
    copy_warmup_steps: int = 300  # steps of pure copying (data.copy_batch) before the agent traces
    copy_batch_size: int = 16  # a copy batch added to every later step (0: none)
    copy_span: int = 32
    engram: bool = True
    mhc: bool = False  # the plain residual learns fastest at this budget (benchmarks/engram_ablation.py)
    stop_after: int | None = None  # stop (and export) at this step of the `steps`-long schedule
    device: str = "cpu"  # "cuda" trains on a GPU; the data stream, and so the run, is the same
    precision: str = "fp32"  # "bf16": matmuls under bf16 autocast (weights, optimizer and loss stay fp32)
    workers: int = 0  # processes preparing batches ahead of the trainer (0: on the training thread)
    kind_weights: tuple[float, ...] = data.traces.KIND_WEIGHTS  # the task mix, one weight per traces.KINDS
    init_from: str | None = None  # an exported checkpoint to continue from (its tokenizer too), not random weights
    piece_words: bool = True  # made-up names and values also built from the tokenizer's tokens (pools.fresh_word)
    piece_max_count: int = pools.PIECE_MAX_COUNT  # tokens in such a word, at most
    question_batch_size: int = 0  # first steps of question groups (data.question_groups) added to every agent step
    question_follow_ups: bool = False  # question batches also hold a last step of each group (after its search)
    runtime_retrieval: float = 0.0  # share of sessions ranking memories with the runtime's embedder (retrieval.py)
    same_form_results: float = 0.0  # share of arithmetic sessions with a saved look-alike result in memory
    saved_results: float = 0.0  # share of remember and question sessions with a saved result in memory
    found_prefix: str = ""  # what an answer from a search's hits opens with ("": the bare sentence)
    refusal: str = data.traces.AnswerForms.refusal  # the answer when a search finds nothing, with the asked {key} in it

    @property
    def answers(self) -> data.traces.AnswerForms:
        """How the answer after a memory search is worded (raises ValueError for a refusal without {key})."""
        return data.traces.AnswerForms(self.found_prefix, self.refusal)

    @property
    def last_step(self) -> int:
        return self.steps if self.stop_after is None else min(self.steps, self.stop_after)

    def to_json(self) -> dict:
        return {**asdict(self), "out_dir": str(self.out_dir)}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    train_loss: float  # mean over the last 50 steps
    held_out_loss: float
    held_out_exact: float  # fraction of held-out sessions whose every action token the model predicts greedily
    held_out_copy: float  # fraction of held-out action tokens outside the action format predicted greedily
    history: list[dict] = field(default_factory=list)


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def held_out_batches(tokenizer: Tokenizer, count: int, batch_size: int,
                     retrieval: Retrieval = WORD_OVERLAP,
                     answers: data.traces.AnswerForms = data.traces.DEFAULT_ANSWERS) -> list[data.PrefixBatch]:
    items = sorted(data.tokenize(tokenizer, data.session_examples(count, HELD_OUT_SEED, held_out=True,
                                                                  retrieval=retrieval, answers=answers)),
                   key=lambda item: len(item.ids))
    return [data.prefix_batch(items[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, count, batch_size)]


def format_tokens(tokenizer: Tokenizer, seed: int, count: int = 400, share: float = 0.05) -> torch.Tensor:
    """[vocab] bool: the ids of the action format (in at least `share` of training sessions' actions: braces,
    keys, tool names, common words). The other action tokens are what the model must copy or compute."""
    counts = torch.zeros(tokenizer.vocab_size)
    for item in data.tokenize(tokenizer, data.session_examples(count, seed=seed + 77, short=True)):
        counts[sorted({t for start, end in item.spans for t in item.ids[start:end]})] += 1
    return counts >= share * count


@torch.no_grad()
def evaluate(model, batches: list[data.PrefixBatch], formatting: torch.Tensor) -> tuple[float, float, float]:
    """(token-weighted mean loss, fraction of sequences whose every labelled token is predicted greedily,
    fraction of labelled tokens outside `formatting` predicted greedily: copying and computing)."""
    was_training = model.training
    model.eval()
    total, tokens, exact, examples, copied, content = 0.0, 0, 0, 0, 0, 0
    device = formatting.device
    for batch in batches:
        batch = batch.to(device)
        loss, hits, labels = batch_loss(model, batch)
        total, tokens = total + float(loss) * labels.numel(), tokens + labels.numel()
        exact, examples = exact + int(hits.all(dim=1).sum()), examples + hits.shape[0]
        outside = ~formatting[labels]
        copied, content = copied + int(hits[batch.labels >= 0][outside].sum()), content + int(outside.sum())
    model.train(was_training)
    return total / max(1, tokens), exact / max(1, examples), copied / max(1, content)


class Trainer:
    """One training run; `run()` trains (resuming from out_dir/train_state when it exists) and exports."""

    def __init__(self, settings: TrainSettings, log=None):
        self.settings = settings
        self.log = log or _Progress(settings.last_step)
        out = settings.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.state_dir = out / "train_state"
        self.tokenizer_dir = self.state_dir / "tokenizer"
        if settings.init_from is not None and not (self.tokenizer_dir / "tokenizer.json").is_file():
            self.tokenizer_dir.mkdir(parents=True, exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (self.tokenizer_dir / name).write_bytes((Path(settings.init_from) / name).read_bytes())
        if (self.tokenizer_dir / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        else:
            self.tokenizer = data.train_tokenizer(self.tokenizer_dir, settings.vocab_size, settings.seed,
                                                  settings.tokenizer_examples)
        if settings.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {settings.precision!r}")
        self.device = torch.device(settings.device)
        config = demo_model_config(self.tokenizer, engram=settings.engram, mhc=settings.mhc)
        self.model, self.tables = build_trainable(config, self.tokenizer, settings.seed)
        if settings.init_from is not None:
            load_exported(self.model, self.tables, Path(settings.init_from))
        self.model.to(self.device)
        if self.tables is not None:
            self.tables.to(self.device)
        self.params = dict(self.model.named_parameters())
        if self.tables is not None:
            self.params.update({f"engram.{layer}": p for layer, p in self.tables.tables.items()})
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)
        self.step, self._last_tokens = 0, 0
        self.history: list[dict] = []
        self.formatting = format_tokens(self.tokenizer, settings.seed).to(self.device)
        self.pieces = settings_pieces(self.tokenizer, settings)  # for question batches
        self._chunks: dict[bool, tuple[int, list[list[data.Tokenized]]]] = {}
        self.prefetcher = (ChunkPrefetcher(self.tokenizer_dir, settings, settings.workers)
                           if settings.workers > 0 else None)

    def _param_groups(self) -> list[dict]:
        s = self.settings
        decay, no_decay, tables = [], [], []
        for name, param in self.params.items():
            if name.startswith("engram."):
                tables.append(param)
            elif param.dim() >= 2 and "_hc." not in name and ".hc_head." not in name:
                decay.append(param)
            else:
                no_decay.append(param)
        groups = [{"params": decay, "weight_decay": s.weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        if tables:
            groups.append({"params": tables, "weight_decay": 0.0, "lr_scale": s.engram_lr_scale})
        return groups

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().cpu().contiguous() for name, p in self.params.items()}
        moments = {}
        for name, param in self.params.items():
            state = self.optimizer.state.get(param)
            if state:
                moments[f"{name}/exp_avg"] = state["exp_avg"].cpu().contiguous()
                moments[f"{name}/exp_avg_sq"] = state["exp_avg_sq"].cpu().contiguous()
                moments[f"{name}/step"] = torch.as_tensor(state["step"], dtype=torch.float32).cpu().reshape(1)
        save_file(weights, str(self.state_dir / "weights.tmp"))
        save_file(moments, str(self.state_dir / "optimizer.tmp"))
        (self.state_dir / "state.tmp").write_text(json.dumps(
            {"step": self.step, "settings": self.settings.to_json(), "history": self.history}))
        for name in ("weights", "optimizer"):
            (self.state_dir / f"{name}.tmp").replace(self.state_dir / f"{name}.safetensors")
        (self.state_dir / "state.tmp").replace(self.state_dir / "state.json")

    def load_state(self) -> bool:
        state_file = self.state_dir / "state.json"
        if not state_file.is_file():
            return False
        state = json.loads(state_file.read_text())
        weights = load_file(str(self.state_dir / "weights.safetensors"))
        moments = load_file(str(self.state_dir / "optimizer.safetensors"))
        if set(weights) != set(self.params):
            raise ValueError(f"{self.state_dir}: saved weights do not match this model (other settings?)")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
                if f"{name}/exp_avg" in moments:
                    self.optimizer.state[param] = {"step": moments[f"{name}/step"][0].clone(),
                                                   "exp_avg": moments[f"{name}/exp_avg"].to(param.device),
                                                   "exp_avg_sq": moments[f"{name}/exp_avg_sq"].to(param.device)}
        self.step, self.history = state["step"], state["history"]
        return True

    # ---- the loop ---------------------------------------------------------------------------------
    def copy_batch(self, step: int) -> data.PrefixBatch | None:
        """Step `step`'s copy batch (a pure function of seed and step): a large one during the warm-up, the
        settings' copy_batch_size after it (None when 0)."""
        s = self.settings
        size = 2 * s.copy_batch_size if step < s.copy_warmup_steps else s.copy_batch_size
        if size == 0:
            return None
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        return data.copy_batch(generator, self.tokenizer.vocab_size, self.tokenizer.bos_token_id, size,
                               s.copy_span).to(self.device)

    def step_loss(self, step: int) -> tuple[torch.Tensor, int]:
        """(the loss step `step` trains on, tokens it computed): the copy batch, plus after the warm-up batch
        `step - copy_warmup_steps` of the agent traces and (question_batch_size > 0) of question groups."""
        losses, tokens = [], 0
        agent = step >= self.settings.copy_warmup_steps
        for batch in (self.copy_batch(step),
                      self.training_batch(step - self.settings.copy_warmup_steps) if agent else None,
                      self.question_batch(step - self.settings.copy_warmup_steps) if agent else None):
            if batch is not None:
                with self.autocast():
                    losses.append(batch_loss(self.model, batch)[0])
                tokens += batch.tokens
        return sum(losses), tokens

    def training_batch(self, step: int) -> data.PrefixBatch:
        """Agent batch `step`, a pure function of (seed, batch sizes, step): full-form sessions at every
        full_every-th step, short-form ones in between (only full-form ones without short batches)."""
        k = self.settings.full_every if self.settings.short_batch_size > 0 else 1
        short = step % k != 0
        full_before = (step + k - 1) // k  # full-form steps before this one
        index = step - full_before if short else step // k
        chunk, position = divmod(index, BATCHES_PER_CHUNK)
        if self._chunks.get(short, (None,))[0] != chunk:
            batches = (self.prefetcher.get(chunk, short) if self.prefetcher is not None
                       else chunk_batches(self.tokenizer, self.settings, chunk, short))
            self._chunks[short] = (chunk, batches)
        return data.prefix_batch(self._chunks[short][1][position], self.tokenizer.pad_token_id).to(self.device)

    def question_batch(self, step: int) -> data.PrefixBatch | None:
        """Agent step `step`'s batch of question groups (a pure function of seed and step; None when the
        settings' question_batch_size is 0)."""
        s = self.settings
        if s.question_batch_size == 0:
            return None
        items = data.tokenize(self.tokenizer, data.question_groups(
            s.question_batch_size, seed=s.seed * 1_000_003 + QUESTION_SEEDS + step, pieces=self.pieces,
            follow_ups=s.question_follow_ups, retrieval=retrieval_for(s.runtime_retrieval),
            answers=s.answers))
        return data.prefix_batch(items, self.tokenizer.pad_token_id).to(self.device)

    def autocast(self):
        """bf16 autocast for the forward pass when the settings ask for it (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.precision == "bf16")

    def train_step(self) -> float:
        """One optimizer step at self.step (learning rate from the schedule); the step's loss."""
        s = self.settings
        factor = learning_rate_factor(self.step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * factor * group["lr_scale"]
        loss, tokens = self.step_loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), s.clip_norm)
        self.optimizer.step()
        self.step += 1
        self._last_tokens = tokens
        return loss.item()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def run(self, deadline: float | None = None) -> TrainResult:
        """Train to the schedule's last step (or, with `deadline`, a time.perf_counter() value, stop and save at
        the first step past it: the schedule is then unfinished, and training.json says so) and export."""
        try:
            return self._run(deadline)
        finally:
            self.close()

    def _run(self, deadline: float | None) -> TrainResult:
        s = self.settings
        torch.manual_seed(s.seed)
        resumed = self.load_state()
        if resumed:
            self.log.note(f"resumed at step {self.step} from {self.state_dir}")
        held_out = held_out_batches(self.tokenizer, s.eval_examples, s.batch_size, retrieval_for(s.runtime_retrieval),
                                    s.answers)
        started, recent, figures, stopped_early = time.perf_counter(), [], None, False
        while self.step < s.last_step:
            tick = time.perf_counter()
            loss_value = self.train_step()
            tokens = self._last_tokens
            recent = (recent + [loss_value])[-50:]
            entry = {"step": self.step, "loss": round(loss_value, 4)}
            figures = None  # the held-out figures of this step, when it is evaluated
            if self.step % s.eval_every == 0 or self.step == s.last_step:
                figures = evaluate(self.model, held_out, self.formatting)
                entry.update(zip(("held_out_loss", "held_out_exact", "held_out_copy"), (round(v, 4) for v in figures)))
            self.history.append(entry)
            self.log.step(self.step, loss_value, tokens / (time.perf_counter() - tick), entry)
            stopped_early = deadline is not None and time.perf_counter() > deadline and self.step < s.last_step
            if self.step % s.checkpoint_every == 0 or self.step == s.last_step or stopped_early:
                self.save_state()
            if stopped_early:
                self.log.note(f"time limit reached: stopping at step {self.step} of {s.last_step}")
                figures = None
                break
        if figures is None:  # a resumed run that had nothing left to train, or one stopped early
            figures = evaluate(self.model, held_out, self.formatting)
        final_loss, final_exact, final_copy = figures
        self.model.cpu()
        if self.tables is not None:
            self.tables.to("cpu")
        export_checkpoint(self.model, self.tables, self.tokenizer_dir, s.out_dir)
        result = TrainResult(self.step, time.perf_counter() - started, sum(recent) / max(1, len(recent)),
                             final_loss, final_exact, final_copy, self.history)
        (s.out_dir / "training.json").write_text(json.dumps(
            {"settings": s.to_json(), "train_loss": result.train_loss, "held_out_loss": final_loss,
             "held_out_exact": final_exact, "held_out_copy": final_copy, "steps_done": self.step,
             "stopped_early": stopped_early, "seconds_this_run": round(result.seconds, 1)}, indent=2) + "\n")
        self.log.done(result)
        return result


class _Progress:
    """One status line (rewritten in place on a terminal, every 10 steps otherwise) with loss and tokens/s."""

    def __init__(self, total: int):
        self.total, self.started, self.tty = total, time.perf_counter(), sys.stderr.isatty()
        self.held_out = ""

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def step(self, step: int, loss: float, tokens_per_s: float, entry: dict) -> None:
        if "held_out_loss" in entry:
            self.held_out = (f" | held-out loss {entry['held_out_loss']:.3f}, copied {entry['held_out_copy']:.0%}, "
                             f"exact {entry['held_out_exact']:.0%}")
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, step) * (self.total - step)
        line = (f"step {step}/{self.total} loss {loss:.3f}{self.held_out} | {tokens_per_s:,.0f} tok/s | "
                f"{elapsed / 60:.1f} min, ~{eta / 60:.0f} min left")
        if self.tty:
            print("\r" + line.ljust(110), end="", file=sys.stderr, flush=True)
        elif step % 10 == 0 or "held_out_loss" in entry:
            print(line, file=sys.stderr, flush=True)

    def done(self, result: TrainResult) -> None:
        if self.tty:
            print(file=sys.stderr)
        print(f"done: {result.steps} steps; held-out loss {result.held_out_loss:.3f}, copied "
              f"{result.held_out_copy:.0%}, exact {result.held_out_exact:.0%}", file=sys.stderr, flush=True)
