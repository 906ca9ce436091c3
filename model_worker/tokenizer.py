"""Text <-> token ids for the model worker: a thin wrapper over a Hugging Face `tokenizers` JSON file.

It does three jobs:
- encode / decode with the checkpoint's BOS/EOS conventions: the post-processor in `tokenizer.json`
  decides, as in transformers 5; a file without one falls back to `add_bos_token` / `add_eos_token`
  from `tokenizer_config.json`;
- render chat messages with the checkpoint's Jinja chat template in a sandbox, with the variables and
  helpers Hugging Face templates expect (`messages`, `add_generation_prompt`, `tools`, special tokens,
  `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML);
- build the Engram compressed token map (MODEL_SPEC.md, "Engram", first bullet): token ids whose
  single-token text normalizes alike share one compressed id.

It deliberately does not: load slow/sentencepiece/pickle tokenizers (only `tokenizer.json`; nothing is
ever unpickled), truncate or pad batches, stream-detokenize, or hash n-grams (`engram_hashing.py`).

The Engram normalizer is built from `tokenizers.normalizers` exactly as DeepSeek's reference does, so
the compressed ids (and thus every Engram hash) match theirs. Its quirks, pinned by the tests against a
plain `unicodedata` rendition: StripAccents drops every combining mark (Mn, Mc, Me), Lowercase maps
char by char (no Greek final sigma), Strip trims Unicode White_Space, and the tables are those of the
Rust crates (they differ from Python's only for characters assigned after Unicode 3.2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, normalizers
from tokenizers import Tokenizer as _BackendTokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Files that mean "a tokenizer in a format we refuse to read" (never unpickled, never converted here).
_UNSUPPORTED_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
_UNSUPPORTED_SUFFIXES = (".pkl", ".pickle", ".tiktoken")

# Tool calls in the default template are written as text between these markers, as
# {"name": ..., "arguments": ...} JSON; a tool's result comes back between the output markers.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_OUTPUT_OPEN, TOOL_OUTPUT_CLOSE = "<tool_output>", "</tool_output>"

# DeepSeek-style chat layout: BOS, the system prompt(s) joined by a blank line (plus the tool list),
# then "<|User|>text" and "<|Assistant|>text<eos>" turns; the generation prompt is "<|Assistant|>".
DEFAULT_CHAT_TEMPLATE = r"""
{%- set ns = namespace(system='') -%}
{%- for message in messages if message['role'] == 'system' -%}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message['content'] -%}
{%- endfor -%}
{%- if tools -%}
    {%- set ns.system = ns.system + ('\n\n' if ns.system else '') + '## Tools\nTo call a tool, write '
        + '<tool_call>{"name": ..., "arguments": {...}}</tool_call>.' -%}
    {%- for tool in tools -%}{%- set ns.system = ns.system + '\n' + (tool | tojson) -%}{%- endfor -%}
{%- endif -%}
{{- bos_token -}}{{- ns.system -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|User|>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|Assistant|>' -}}
        {%- if message['content'] is defined -%}{{- message['content'] -}}{%- endif -%}
        {%- for call in message['tool_calls'] | default([]) -%}
            {%- set args = call['function']['arguments'] -%}
            {{- '<tool_call>{"name": ' + (call['function']['name'] | tojson) + ', "arguments": '
                + (args if args is string else args | tojson) + '}</tool_call>' -}}
        {%- endfor -%}
        {{- eos_token -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<tool_output>' + message['content'] + '</tool_output>' -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('unsupported message role: ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|Assistant|>' -}}{%- endif -%}
"""

# ---------------------------------------------------------------------------------------------------
# Engram normalization

_LONE_SPACE_SENTINEL = "\ue000"  # private-use char that shields a text of exactly " " from Strip
_ENGRAM_NORMALIZER = normalizers.Sequence(
    [
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _LONE_SPACE_SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_LONE_SPACE_SENTINEL, " "),
    ]
)


def normalize_for_engram(text: str) -> str:
    """NFKC, NFD, strip accents, lowercase, collapse [ \\t\\r\\n]+ to " ", strip (a lone " " survives).

    Like DeepSeek's reference, any U+E000 in the input also comes out as a space.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _ENGRAM_NORMALIZER.normalize_str(text)


# ---------------------------------------------------------------------------------------------------
# Chat templates


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON without Jinja's HTML escaping, as Hugging Face templates expect."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (no path to interpreter internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _compile_chat_template(source: str, where: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template from {where} is not valid Jinja: {exc}") from exc


def _plain_content(content: Any, where: str) -> str | None:
    """A message's content as text: a str, None, or OpenAI-style [{"type": "text", "text": ...}] parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}[{j}] must be a {{'type': 'text', 'text': str}} part, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where} must be a str, a list of text parts or None, got {type(content).__name__}")


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated copies of chat messages, with None-valued keys dropped (as transformers does)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty str, got {role!r}")
        content = _plain_content(message.get("content"), f"messages[{i}]['content']")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] is missing (only assistant tool calls may omit it)")
        plain = {k: v for k, v in message.items() if v is not None}
        if content is not None:
            plain["content"] = content
        checked.append(plain)
    return checked


# ---------------------------------------------------------------------------------------------------
# tokenizer_config.json


def _token_string(config: Mapping[str, Any], key: str) -> str | None:
    """A special token named in the config: a str, an AddedToken dict {"content": ...}, or absent/None."""
    value = config.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{CONFIG_FILE} field {key!r} must be a token string, got {value!r}")
    return value


def _flag(config: Mapping[str, Any], key: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{CONFIG_FILE} field {key!r} must be true or false, got {value!r}")
    return value


def _chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates: from chat_template.jinja, else the config's str or [{name, template}] list."""
    jinja_file = path / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{CONFIG_FILE} field 'chat_template' must be a str or a list of {{name, template}}")


def _missing_tokenizer_error(path: Path) -> FileNotFoundError:
    found = sorted(p.name for p in path.iterdir() if p.name in _UNSUPPORTED_FILES or p.suffix in _UNSUPPORTED_SUFFIXES)
    message = f"no {TOKENIZER_FILE} in {path}"
    if found:
        message += (
            f" (found {', '.join(found)}: only the Hugging Face `tokenizers` JSON format is supported; "
            "convert it with transformers' save_pretrained first; pickle files are never loaded)"
        )
    return FileNotFoundError(message)


# ---------------------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens, chat template and Engram token map."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        config: Mapping[str, Any] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        source: str = "<memory>",
    ) -> None:
        config = dict(config or {})
        self._backend = backend
        self.source = source
        # Ids may have holes; the map and embeddings must cover the largest id.
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.bos_token, self.eos_token, self.pad_token = (
            _token_string(config, k) for k in ("bos_token", "eos_token", "pad_token")
        )
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        self.eos_token_id = self._id_of(self.eos_token, "eos_token")
        self.pad_token_id = self._id_of(self.pad_token, "pad_token")
        add_bos, add_eos = _flag(config, "add_bos_token"), _flag(config, "add_eos_token")
        # The file's post-processor decides (as in transformers 5); only without one do the config
        # flags add BOS/EOS (as transformers 4's Llama tokenizers did).
        self._own_special_tokens = backend.post_processor is None
        self.add_bos_token = self._own_special_tokens and bool(add_bos) and self.bos_token_id is not None
        self.add_eos_token = self._own_special_tokens and bool(add_eos) and self.eos_token_id is not None
        templates = dict(chat_templates) if chat_templates else {"default": DEFAULT_CHAT_TEMPLATE}
        if "default" not in templates:
            raise ValueError(f"chat templates of {source} have no 'default' entry: {sorted(templates)}")
        self._chat_templates = {name: _compile_chat_template(t, f"{source}:{name}") for name, t in templates.items()}
        self.chat_template: str = templates["default"]
        self._token_map: np.ndarray | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `path/tokenizer.json` and, when present, `tokenizer_config.json` / `chat_template.jinja`."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise _missing_tokenizer_error(path)
        try:
            backend = _BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"cannot read {tokenizer_file}: {exc}") from exc
        config: dict[str, Any] = {}
        config_file = path / CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} must hold a JSON object")
        return cls(backend, config, _chat_templates(path, config), source=str(path))

    def __len__(self) -> int:
        return self.vocab_size

    def _id_of(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{CONFIG_FILE} field {key!r}: token {token!r} is not in the vocabulary")
        return token_id

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # --- encode / decode --------------------------------------------------------------------------

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        head = [self.bos_token_id] if self.add_bos_token else []
        tail = [self.eos_token_id] if self.add_eos_token else []
        return head + ids + tail

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        if self._own_special_tokens:
            encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
            ids = [list(e.ids) for e in encodings]
            return [self._with_special_tokens(i) for i in ids] if add_special_tokens else ids
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, numpy array or 1-D tensor of ints in [0, vocab_size))."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            id_list = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ids must be a flat sequence of ints: {exc}") from exc
        bad = [i for i in id_list if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids holds values outside [0, {self.vocab_size}): {bad[:5]}")
        return self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """Render a conversation as prompt text; encode the result with add_special_tokens=False.

        messages: [{"role": str, "content": str | [text parts] | None, ...}]; tools: JSON schemas.
        Raises TypeError/ValueError for malformed messages or when the template rejects them.
        """
        checked = _checked_messages(messages)
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
            raise TypeError("tools must be a list of dicts (JSON schemas) or None")
        template = self._chat_templates.get("tool_use" if tools else "default", self._chat_templates["default"])
        special = {
            k: v
            for k, v in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
            )
            if v is not None
        }
        try:
            return template.render(
                messages=checked,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **special,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat template rejected the messages: {exc}") from exc
        except (TypeError, KeyError) as exc:
            raise ValueError(f"chat template failed on the messages ({type(exc).__name__}: {exc})") from exc

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of the rendered conversation (the template already holds BOS; none is added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)

    # --- Engram -------------------------------------------------------------------------------------

    def compressed_token_map(self) -> np.ndarray:
        """Engram compressed id of every token id: int64 [vocab_size], numbered by first appearance.

        Each id is decoded alone with special tokens kept; a text holding U+FFFD (a partial UTF-8
        byte sequence) is keyed by the raw token string, any other by normalize_for_engram(text), or
        the text itself when that normalizes to "". Computed once, then cached (read-only).
        """
        if self._token_map is None:
            texts = self._backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
            key_to_compressed: dict[str | None, int] = {}
            token_map = np.empty(self.vocab_size, dtype=np.int64)
            for token_id, text in enumerate(texts):
                if "\ufffd" in text:
                    key = self._backend.id_to_token(token_id)
                else:
                    key = _ENGRAM_NORMALIZER.normalize_str(text) or text
                token_map[token_id] = key_to_compressed.setdefault(key, len(key_to_compressed))
            token_map.flags.writeable = False
            self._token_map = token_map
        return self._token_map

    @property
    def compressed_vocab_size(self) -> int:
        """Number of distinct compressed ids (max of the map + 1)."""
        token_map = self.compressed_token_map()
        return int(token_map.max()) + 1 if token_map.size else 0


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Tokenizer.from_pretrained(path)."""
    return Tokenizer.from_pretrained(path)
