"""Structured output: constrain generation to a JSON Schema, a regex or a Lark grammar.

    from ondevice.structured import generate_structured
    data = generate_structured(model, "Extract the issue: ...", json_schema=SCHEMA, temperature=0)

Token masking is done by llguidance (Microsoft's guidance engine, Rust, no Python dependencies): it builds a
token trie from the model's own tokenizer.json and computes, per step, a bitmask of the tokens that keep the
output a prefix of some string in the language. Why llguidance: it takes a tokenizer.json directly (our runtime
has one in memory), works on plain numpy buffers (xgrammar needs torch; outlines-core needs a hand-built
vocabulary map), supports JSON Schema, regex and Lark with one engine, and its per-token cost (mask + consume,
~0.6-1 ms for the issue schema on SmolLM2's 49k vocabulary) is 1-2% of a decode step here
(examples/issue_extraction.py reports it next to decode time).

The mask is applied in the sampler (disallowed logits become -inf before any other sampling step), so every
temperature is safe: the sampled token is always one the grammar accepts. EOS is allowed only when the grammar
is in an accepting state, and generation ends as soon as the grammar cannot be extended.

The token budget (max_tokens) never cuts a document short: `TokenFilter.fit_budget` keeps, after every token,
a way to finish the document within the tokens that remain. It knows the shortest closing it can find from the
current state (`closing()`: end the string, fill the required fields with minimal valid values, close the
brackets; found by a greedy walk over the matcher and then re-tokenized into as few tokens as the grammar
accepts), and when a sampled token would leave less room than its closing needs, it puts the closing in its
place. The reply then ends complete and valid, with finish_reason "length" and `closed_at_limit` set. A schema
whose shortest document does not fit in max_tokens is an error before generation. `max_string_tokens=N` ends
every JSON string after N tokens of content (when its schema allows it to end there), so one runaway string
cannot take the whole budget.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import MissingExtraError, OndeviceError

# JSON compile defaults: compact separators and no free whitespace. Flexible whitespace lets a small model
# emit newlines forever inside an object and run out of tokens; a fixed ", " / ": " layout keeps the document
# short and deterministic in shape without limiting what values it can hold.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(OndeviceError):
    """The schema/regex/grammar is invalid or unsupported, or the output could not be completed."""


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError("structured output needs llguidance (an ondevice dependency): pip install llguidance") from exc
    return llguidance


# Building an LLTokenizer walks the whole vocabulary (~2 s for 49k tokens); do it once per loaded codec.
_tokenizer_cache: dict[int, tuple[Any, Any]] = {}
_tokenizer_lock = threading.Lock()


def ll_tokenizer(model: Any) -> Any:
    """The llguidance tokenizer for a LanguageModel (cached per model codec)."""
    llg = _llguidance()
    codec = model.codec
    with _tokenizer_lock:
        hit = _tokenizer_cache.get(id(codec))
        if hit is not None and hit[0] is codec:
            return hit[1]
        tok = llg.LLTokenizer(codec.tokenizer.to_str(), n_vocab=int(model.spec.vocab_size),
                              eos_token=sorted(codec.eos_ids))
        _tokenizer_cache[id(codec)] = (codec, tok)
        return tok


def load_schema(schema: dict | str | Path) -> dict:
    """A JSON Schema from a dict, a JSON string, or a path to a .json file (clear errors otherwise)."""
    if isinstance(schema, dict):
        return schema
    looks_like_json = isinstance(schema, str) and schema.lstrip()[:1] in ("{", "[")
    if isinstance(schema, Path) or not looks_like_json:
        path = Path(schema)
        if not path.is_file():
            raise StructuredOutputError(f"JSON schema file not found: {path}")
        text = path.read_text(encoding="utf-8")
        where = str(path)
    else:
        text, where = schema, "the JSON schema"
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                                    f"{exc.colno}") from exc
    if not isinstance(loaded, dict):
        raise StructuredOutputError(f"{where} must be a JSON object (a JSON Schema), got {type(loaded).__name__}")
    return loaded


def _check_schema(schema: dict) -> None:
    """Reject schemas that are not valid JSON Schema (when jsonschema is installed: better messages)."""
    try:
        import jsonschema
    except ImportError:
        return
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path) or "(root)"
        raise StructuredOutputError(f"invalid JSON schema at {at}: {exc.message.splitlines()[0]}") from exc


def compile_grammar(*, json_schema: dict | str | Path | None = None, regex: str | None = None,
                    grammar: str | None = None) -> str:
    """An llguidance grammar string for exactly one of json_schema / regex / grammar (Lark)."""
    given = [name for name, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if v is not None]
    if len(given) != 1:
        raise StructuredOutputError(f"pass exactly one of json_schema=, regex=, grammar= (got {given or 'none'})")
    llg = _llguidance()
    if json_schema is not None:
        schema = load_schema(json_schema)
        _check_schema(schema)
        try:
            compiled = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise StructuredOutputError(f"invalid JSON schema: {exc}") from exc
    elif regex is not None:
        compiled = llg.LLMatcher.grammar_from_regex(regex)
    else:
        compiled = llg.LLMatcher.grammar_from_lark(grammar)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(compiled)
    if is_error:
        kind = given[0].replace("_", " ")
        detail = " ".join(messages[0].split())[:300] if messages else "unknown error"  # one line
        raise StructuredOutputError(f"unsupported or invalid {kind}: {detail}")
    return compiled


class TokenFilter:
    """The runtime's token_filter protocol (allowed / accept / is_finished) backed by an llguidance matcher.

    One filter serves one generation; make a new one (cheap: the tokenizer is cached) per request.
    `mask_s` / `steps` accumulate the time spent computing masks and consuming tokens, for measurements.
    """

    def __init__(self, model: Any, *, json_schema: dict | str | Path | None = None, regex: str | None = None,
                 grammar: str | None = None, compiled: str | None = None, close_at_limit: bool = True,
                 max_string_tokens: int | None = None) -> None:
        llg = _llguidance()
        self.model = model
        self.grammar = compiled or compile_grammar(json_schema=json_schema, regex=regex, grammar=grammar)
        self.vocab_size = int(model.spec.vocab_size)
        self.matcher = llg.LLMatcher(ll_tokenizer(model), self.grammar, log_level=0)
        if self.matcher.is_error():
            raise StructuredOutputError(f"could not build the grammar: {self.matcher.get_error()}")
        words = (self.vocab_size + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)
        self.mask_s = 0.0
        self.steps = 0
        self.close_at_limit = close_at_limit  # False: the old behaviour, the budget may cut the document short
        if max_string_tokens is not None and max_string_tokens < 1:
            raise StructuredOutputError(f"max_string_tokens must be >= 1, got {max_string_tokens}")
        self.max_string_tokens = max_string_tokens  # a JSON string's content ends after this many tokens
        self._string_tokens = 0  # tokens inside the current string so far
        self.budget_s = 0.0  # time spent keeping the document finishable within the budget
        self.budget: int | None = None  # tokens this generation may still emit (None: no budget)
        self.plan: list[int] = []  # the closing being forced, once the budget requires it
        self.closed_at_limit = False
        self._state = (False, False)  # (inside a JSON string, after a backslash) at the end of the output
        self._need = 0  # tokens the last closing computed took
        self._retokenized: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ the token budget
    def start_budget(self, max_tokens: int) -> None:
        """Keep every later state finishable within max_tokens (see fit_budget); an error if even the shortest
        document does not fit. A grammar the closing walk cannot finish (rare: a regex that needs characters
        beyond printable ASCII) keeps the old behaviour: the budget may cut it short."""
        if not self.close_at_limit:
            return
        start = time.perf_counter()
        closing = self.closing(fit=max_tokens)
        self.budget_s += time.perf_counter() - start
        if closing is None:
            return
        self._need = len(closing)
        if self._need > max_tokens:
            raise StructuredOutputError(f"the shortest output this schema allows takes {self._need} tokens; "
                                        f"max_tokens is {max_tokens}")
        self.budget = max_tokens

    def fit_budget(self, token: int) -> int:
        """The token to emit instead of `token` (the sampled one) so the rest still fits the budget: `token`
        itself while its closing fits in what remains after it, else the first token of the current closing
        (which fits: that held one step earlier)."""
        if self.budget is None:
            return token
        start = time.perf_counter()
        try:
            return self._fit_budget(token)
        finally:
            self.budget_s += time.perf_counter() - start

    def _fit_budget(self, token: int) -> int:
        if self.plan:
            return self.plan[0]
        if token in self.model.codec.eos_ids:
            return token  # EOS ends the document (allowed only when it is complete)
        piece = self._piece(token)
        if (self.budget - 1 >= self._need + _BUDGET_MARGIN and self._state == (True, False)
                and not _STRUCTURAL.intersection(piece)):
            # far from the limit, and more content of a string (which ends with its quote whatever it holds):
            # the closing stays as long, no walk needed
            return token
        after = self.matcher.deep_copy()
        if after.consume_token(int(token)):
            closing = self._closing_from(after, _string_state(piece, self._state), fit=self.budget - 1)
            if closing is not None and len(closing) <= self.budget - 1:
                self._need = len(closing)
                return token
        plan = self.closing(fit=self.budget)
        if plan is None:  # cannot happen after a successful walk one step earlier; stop steering rather than fail
            self.budget = None
            return token
        self.closed_at_limit = True
        if not plan:  # complete already, and the token would open more than fits: end here
            if not self.model.codec.eos_ids:  # a model without an end token: nothing to end with
                self.budget = None
                return token
            return min(self.model.codec.eos_ids)
        self.plan = plan
        return self.plan[0]

    def _piece(self, token: int) -> str:
        return self.model.codec.decode([int(token)])

    def closing(self, fit: int | None = None) -> list[int] | None:
        """The shortest token sequence found that completes the document from the current state (None: none
        found); `fit`: a length it should not exceed (searched harder for when the quick walk's does)."""
        return self._closing_from(self.matcher.deep_copy(), self._state, fit)

    def _closing_from(self, matcher: Any, state: tuple[bool, bool], fit: int | None = None) -> list[int] | None:
        """A short completion from `matcher`'s state (consumed): a greedy walk one character at a time (`_walk`),
        re-tokenized when the grammar accepts the text in fewer tokens. When that does not fit in `fit` tokens,
        a slower walk that tries the alternatives at choice points (a function name, an enum value) as well."""
        if matcher.is_accepting():
            return []
        greedy = self._tokens_of(matcher, self._walk(matcher.deep_copy(), state, 256, branches=0))
        if greedy is not None and (fit is None or len(greedy) <= fit):
            return greedy
        searched = self._tokens_of(matcher, self._walk(matcher.deep_copy(), state, 256, branches=2))
        if searched is not None and (greedy is None or len(searched) < len(greedy)):
            return searched
        return greedy

    def _tokens_of(self, matcher: Any, walked: list[int] | None) -> list[int] | None:
        """The walked characters as fewer, longer tokens when the grammar accepts those from `matcher`'s state."""
        if walked is None:
            return None
        text = self.model.detokenize(walked)
        shorter = self._retokenized.get(text)
        if shorter is None:  # the same closing text comes back step after step: tokenize it once
            if len(self._retokenized) > 4096:
                self._retokenized.clear()
            shorter = self._retokenized[text] = self.model.tokenize(text, add_bos=False)
        if len(shorter) < len(walked) and matcher.validate_tokens(shorter) == len(shorter):
            check = matcher.deep_copy()
            check.consume_tokens(shorter)
            if check.is_accepting():
                return shorter
        return walked

    def _walk(self, probe: Any, state: tuple[bool, bool], max_chars: int, branches: int) -> list[int] | None:
        """Characters (one-character tokens) that take `probe` to an accepting state, consumed into it: closers
        first (inside a string the quote, outside it brackets, then the shortest values, then any printable
        character). Where the grammar offers a few alternatives (a function name, an enum value, a key), up to
        `branches` times, each is walked on and the shortest kept."""
        chars = _char_tokens(self.model)
        walked: list[int] = []
        in_string, escaped = state
        while len(walked) < max_chars:
            forced = [] if in_string else probe.compute_ff_tokens()  # a literal: take it whole
            if forced:
                probe.consume_tokens(forced)
                walked.extend(forced)
                in_string, escaped = _string_state(self.model.detokenize(forced), (in_string, escaped))
                if probe.is_accepting():
                    return walked
                continue
            order = _ESCAPE_ORDER if escaped else (_IN_STRING_ORDER if in_string else _OUTSIDE_ORDER)
            found = next((ch for ch in (*order, *chars) if ch in chars and probe.validate_tokens([chars[ch]]) == 1),
                         None)
            if found is None:
                return None
            if branches > 0 and found.isalnum():
                options = [ch for ch in _ALNUM if ch in chars and probe.validate_tokens([chars[ch]]) == 1]
                if 1 < len(options) <= _MAX_OPTIONS:
                    best = None
                    for ch in options:
                        branch = probe.deep_copy()
                        branch.consume_token(chars[ch])
                        rest = ([] if branch.is_accepting() else
                                self._walk(branch, (in_string, False), max_chars - len(walked) - 1, branches - 1))
                        if rest is not None and (best is None or len(rest) + 1 < len(best)):
                            best = [chars[ch], *rest]
                    if best is None:
                        return None
                    for tid in best:
                        probe.consume_token(tid)
                    return walked + best
            tid = chars[found]
            probe.consume_token(tid)
            walked.append(tid)
            if escaped:
                escaped = False
            elif found == "\\" and in_string:
                escaped = True
            elif found == '"':
                in_string = not in_string
            if probe.is_accepting():
                return walked
        return None

    def forced_tokens(self, k: int) -> list[int]:
        """Up to k tokens the grammar forces next (the closing being forced, or llguidance's fast-forward tokens:
        a key's text, a separator): drafts for speculative decoding that the model all but always agrees with."""
        if self.plan:
            return self.plan[:k]
        start = time.perf_counter()
        tokens = list(self.matcher.compute_ff_tokens())[:k]
        self.mask_s += time.perf_counter() - start
        return tokens

    def _only(self, token: int) -> np.ndarray:
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[token] = True
        return mask

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary: True where the token keeps the output in the language."""
        if self.plan:  # forcing the closing: only its next token
            return self._only(self.plan[0])
        if (self.max_string_tokens is not None and self._state == (True, False)
                and self._string_tokens >= self.max_string_tokens):
            quote = _char_tokens(self.model).get('"')
            if quote is not None and self.matcher.validate_tokens([quote]) == 1:
                return self._only(quote)  # the string has had its tokens: end it (when its schema allows)
        start = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise StructuredOutputError(f"structured output failed: {self.matcher.get_error()}")
        # Bit j of 32-bit word i is token 32*i + j (little-endian words, least significant bit first).
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)
        if not mask.any():
            raise StructuredOutputError("the grammar allows no token at this point (is it satisfiable?)")
        self.mask_s += time.perf_counter() - start
        self.steps += 1
        return mask

    def accept(self, token_id: int) -> None:
        start = time.perf_counter()
        ok = self.matcher.consume_token(int(token_id))
        self.mask_s += time.perf_counter() - start
        if not ok:
            raise StructuredOutputError(f"token {token_id} was rejected by the grammar: {self.matcher.get_error()}")
        if self.plan and self.plan[0] == token_id:
            self.plan.pop(0)
        if self.budget is not None:
            self.budget -= 1
        if self.budget is not None or self.max_string_tokens is not None:
            was_in_string = self._state[0]
            self._state = _string_state(self._piece(token_id), self._state)
            self._string_tokens = self._string_tokens + 1 if was_in_string and self._state[0] else 0

    def is_finished(self) -> bool:
        """True once nothing but EOS can follow (the document is complete)."""
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


# Greedy closing order, one character at a time: what ends a structure soonest first.
_IN_STRING_ORDER = '"' + "abcdefghijklmnopqrstuvwxyz0123456789 "
_OUTSIDE_ORDER = '}]"0' + ",: " + "123456789" + "abcdefghijklmnopqrstuvwxyz" + "[{-.+E"
_ESCAPE_ORDER = 'n"\\'
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_MAX_OPTIONS = 8  # more letters than this allowed: free text, not a choice between a few alternatives
_STRUCTURAL = frozenset('{}[]",:\\')  # a token with one of these may change how much closing takes
_BUDGET_MARGIN = 24  # further than this from the limit, string content goes unchecked (a pattern may add a few)
_char_token_cache: dict[int, tuple[Any, dict[str, int]]] = {}


def _char_tokens(model: Any) -> dict[str, int]:
    """Printable ASCII characters that are one token each, for the closing walk (cached per codec)."""
    codec = model.codec
    hit = _char_token_cache.get(id(codec))
    if hit is not None and hit[0] is codec:
        return hit[1]
    table = {}
    for code in range(32, 127):
        ids = model.tokenize(chr(code), add_bos=False)
        if len(ids) == 1:
            table[chr(code)] = ids[0]
    _char_token_cache[id(codec)] = (codec, table)
    return table


def _string_state(text: str, state: tuple[bool, bool] = (False, False)) -> tuple[bool, bool]:
    """(inside a JSON string?, right after a backslash?) after `text`, starting from `state`."""
    in_string, escaped = state
    for ch in text:
        if escaped:
            escaped = False
        elif in_string and ch == "\\":
            escaped = True
        elif ch == '"':
            in_string = not in_string
    return in_string, escaped


def stream_structured(model: Any, prompt: str | list[dict[str, str]], *, json_schema: Any = None,
                      regex: str | None = None, grammar: str | None = None,
                      **generate_kwargs: Any) -> tuple[TokenFilter, Iterator[str]]:
    """(filter, text stream): the filter is returned so callers can check is_accepting() afterwards."""
    token_filter = TokenFilter(model, json_schema=json_schema, regex=regex, grammar=grammar)
    return token_filter, model.generate(prompt, token_filter=token_filter, **generate_kwargs)


def generate_structured(model: Any, prompt: str | list[dict[str, str]], *, json_schema: Any = None,
                        regex: str | None = None, grammar: str | None = None, parse: bool = True,
                        **generate_kwargs: Any) -> Any:
    """Generate text constrained by a JSON schema, regex or Lark grammar.

    Returns the parsed JSON value for json_schema= (the text with parse=False), the text otherwise.
    Raises StructuredOutputError if max_tokens ran out before the output was complete.
    """
    token_filter, stream = stream_structured(model, prompt, json_schema=json_schema, regex=regex,
                                             grammar=grammar, **generate_kwargs)
    text = "".join(stream)
    if not token_filter.is_accepting():
        reason = model.last_stats.finish_reason
        hint = ("raise max_tokens or bound the schema (maxLength, maxItems, enum)" if reason == "length"
                else "a stop string or the context window cut it short")
        raise StructuredOutputError(f"output ended before it was complete ({reason}): {hint}")
    if json_schema is not None and parse:
        return json.loads(text)
    return text
