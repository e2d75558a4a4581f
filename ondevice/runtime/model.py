"""The runtime's public model object: `ondevice.load(path)` -> LanguageModel.

generate() streams UTF-8-safe text pieces; the KV cache keeps the tokens it holds, so a follow-up chat turn
only evaluates what is new (the common prefix is reused).
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import InvalidMessagesError, OndeviceError
from ondevice.formats.gguf import GGUFFile
from ondevice.model import ModelSpec
from ondevice.runtime.kv import DEFAULT_KV_CACHE, check_kv_cache
from ondevice.runtime.sampling import DEFAULTS, Sampler, SamplingParams, logit_bias_pairs
from ondevice.runtime.shift import Dropped, common_prefix, shift_full_slot, shorten_prompt
from ondevice.runtime.speculative import DraftLength, PromptLookup, check_speculate, model_draft
from ondevice.runtime.text import StopMatcher, StreamDecoder, TextCodec
from ondevice.runtime.transformer import ContextOverflowError, Transformer, kernels
from ondevice.runtime.weights import load_weights


def _context_size(requested: int | None, limit: int) -> int:
    if requested is not None and requested < 1:
        raise OndeviceError(f"n_ctx must be >= 1, got {requested}")
    return min(requested or 2048, limit)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    generated_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string), "length" (max_tokens), "context" (window full)
    drafted_tokens: int = 0  # speculative decoding: tokens proposed by the draft
    accepted_tokens: int = 0  # ... and the ones that matched the sampled token (each saved one forward pass)
    forward_passes: int = 0  # decode forward passes (plain decoding: generated_tokens - 1)
    closed_at_limit: bool = False  # structured output: the budget was reached, so the structure was closed early
    tokens: list[int] = field(default_factory=list)
    first_token_at: float = field(default=0.0, repr=False)  # perf_counter() when the first token was sampled

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from the prefill logits; decode steps produce the rest.
        n = self.generated_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("tokens")
        data.pop("first_token_at")
        data.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: list[Any]) -> None:
    """Chat messages are untrusted input (they come from apps and HTTP clients): say which one is wrong."""
    if not isinstance(messages, list) or not messages:
        raise InvalidMessagesError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidMessagesError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessagesError(f"message {i}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if "content" not in message:
            raise InvalidMessagesError(f"message {i} ({role}) has no 'content'")
        if not isinstance(message["content"], str):
            raise InvalidMessagesError(f"message {i} ({role}): content must be a string, "
                                       f"got {type(message['content']).__name__}")


def _return_free_heap() -> None:
    """Give the heap freed by the tokenizer build (Python strings, JSON, ~10 MB) back to the OS (glibc only)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl and others: nothing to do
            pass


def _finish(stats: GenerationStats, token_filter: Any, reason: str) -> None:
    """End of a reply: a structured one that the token budget closed early reports "length" and the flag."""
    stats.closed_at_limit = bool(getattr(token_filter, "closed_at_limit", False))
    stats.finish_reason = "length" if stats.closed_at_limit else reason


@dataclass
class Request:
    """A generation request, checked and tokenized (LanguageModel.prepare)."""

    tokens: list[int]
    max_tokens: int
    sampler: Sampler
    stops: list[str]
    token_filter: Any
    speculate: str | None
    shift_keep: int | None = None  # context shift on: the first tokens always kept (the system prompt); None: off


@dataclass
class Decoding:
    """The state of one reply being decoded: take() turns the logits of each step into the next token and text.
    LanguageModel's loop and the batch share it, so a reply is the same whichever way it runs."""

    stats: GenerationStats
    sampler: Sampler
    history: list[int]  # prompt + accepted tokens
    codec: TextCodec
    matcher: StopMatcher
    max_tokens: int
    token_filter: Any
    n_ctx: int
    start: float  # perf_counter() at the request's start (TTFT)
    decoder: StreamDecoder = field(init=False)
    stopped_by_string: bool = False

    def __post_init__(self) -> None:
        self.decoder = StreamDecoder(self.codec)
        self.budget = getattr(self.token_filter, "fit_budget", None)  # structured output closing at the limit

    def take(self, logits: np.ndarray) -> tuple[str, bool]:
        """Sample the next token; (text to emit, whether the reply goes on: then history[-1] is to evaluate)."""
        stats, token_filter = self.stats, self.token_filter
        mask = token_filter.allowed() if token_filter is not None else None
        token = self.sampler.sample(logits, self.history, mask)
        if self.budget is not None:
            token = self.budget(token)  # may swap in the first token of the shortest closing
        if stats.generated_tokens == 0:
            stats.first_token_at = time.perf_counter()
            stats.ttft_s = stats.first_token_at - self.start
        stats.generated_tokens += 1
        stats.tokens.append(token)
        if token in self.codec.eos_ids:
            _finish(stats, token_filter, "stop")
            return "", False
        if token_filter is not None:
            token_filter.accept(token)
        self.history.append(token)
        text, stopped = self.matcher.feed(self.decoder.push(token))
        if stopped:
            stats.finish_reason = "stop"
            self.stopped_by_string = True
        elif token_filter is not None and token_filter.is_finished():
            _finish(stats, token_filter, "stop")
        elif stats.generated_tokens >= self.max_tokens:
            _finish(stats, token_filter, "length")
        elif len(self.history) >= self.n_ctx:
            stats.finish_reason = "context"
        else:
            return text, True
        return text, False

    def tail(self) -> str:
        """Text held back at the end (an incomplete UTF-8 sequence, a partial stop-string match)."""
        if self.stopped_by_string:
            return ""
        return self.matcher.feed(self.decoder.flush())[0] + self.matcher.flush()


class LanguageModel:
    """A loaded model: text in, text out. The `transformer` does the math (C kernels for GGUF; other backends,
    such as an ExecuTorch program, plug in through `from_backend` with the same forward(tokens, pos0) contract)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, n_ctx: int | None = None,
                 kv_cache: str = DEFAULT_KV_CACHE) -> None:
        check_kv_cache(kv_cache)  # before the file is read; the head size is checked once it is known
        gguf = GGUFFile(path)
        try:
            # The tokenizer first: its build's transient heap is returned before the weights become resident,
            # so the two never add up in the peak RSS.
            codec = TextCodec.from_gguf(gguf)
            template = gguf.get("tokenizer.chat_template")
            gguf.drop_fields("tokenizer.ggml.")
            _return_free_heap()
            weights = load_weights(gguf)
            check_kv_cache(kv_cache, weights.spec.head_dim)
        except BaseException:
            gguf.close()
            raise
        k = kernels()
        if threads is not None:
            if threads < 1:
                gguf.close()
                raise OndeviceError(f"threads must be >= 1, got {threads}")
            k.set_threads(threads)
        n_ctx = _context_size(n_ctx, weights.spec.context_length)
        self._setup(str(path), weights.spec, codec, str(template) if template is not None else None,
                    Transformer(weights, n_ctx, kv_cache=kv_cache), n_ctx, k.get_threads())
        self.weights = weights
        self._gguf: GGUFFile | None = gguf

    @classmethod
    def from_backend(cls, path: str | Path, transformer: Any, spec: ModelSpec, codec: TextCodec,
                     chat_template: str | None, *, n_ctx: int | None = None, threads: int = 0) -> LanguageModel:
        """A model whose forward pass runs elsewhere (e.g. ExecuTorch); tokenizer, template and generation loop
        are ondevice's own, so the API and the outputs' handling are identical."""
        self = cls.__new__(cls)
        self._setup(str(path), spec, codec, chat_template, transformer,
                    _context_size(n_ctx, min(spec.context_length, transformer.n_ctx)), threads)
        self.weights = None
        self._gguf = None
        return self

    def _setup(self, path: str, spec: ModelSpec, codec: TextCodec, chat_template: str | None, transformer: Any,
               n_ctx: int, threads: int) -> None:
        self.path = path
        self.spec = spec
        self.codec = codec
        self.chat_template = chat_template
        self.transformer = transformer
        self.n_ctx = n_ctx
        self.threads = threads
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self._dropped = Dropped()  # context shift: what the cache's conversation left out (ondevice.runtime.shift)
        self._prompt_logits: tuple[int, np.ndarray] | None = None  # (prompt length, its last logits)
        self.draft_model: LanguageModel | None = None  # drafts for speculate="draft" (set_draft)
        self.last_stats = GenerationStats()

    def set_draft(self, draft: LanguageModel | None) -> None:
        """A model with the same vocabulary that drafts tokens for `speculate="draft"` (None: none)."""
        if draft is not None:
            if draft.spec.vocab_size != self.spec.vocab_size or draft.codec.eos_ids != self.codec.eos_ids or \
                    draft.codec.tokenizer.get_vocab() != self.codec.tokenizer.get_vocab():
                raise OndeviceError(f"the draft model {Path(draft.path).name} has another vocabulary than "
                                    f"{Path(self.path).name}; a draft must share the tokenizer")
        self.draft_model = draft

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.codec.encode(text, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self.codec.decode(list(ids))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        from ondevice.chat_template import render_chat

        if not self.chat_template:
            raise OndeviceError(f"{self.path} has no chat template; pass a plain prompt string instead of messages")
        bos = self.codec.token_text(self.codec.bos_id) if self.codec.bos_id is not None else ""
        eos_id = min(self.codec.eos_ids) if self.codec.eos_ids else None
        eos = self.codec.token_text(eos_id) if eos_id is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos, **template_vars)

    def prompt_tokens(self, prompt: str | list[dict[str, str]], **template_vars: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        check_messages(prompt)
        text = self.apply_chat_template(prompt, **template_vars)
        # Templates that print the BOS themselves must not get a second one.
        bos = self.codec.token_text(self.codec.bos_id) if self.codec.bos_id is not None else None
        return self.tokenize(text, add_bos=False if bos and text.startswith(bos) else None)

    # ------------------------------------------------------------------ evaluation
    def _eval(self, tokens: list[int], all_logits: bool = False) -> tuple[np.ndarray, int]:
        """Bring the cache to `tokens` reusing the common prefix; logits for the last (or all new) tokens."""
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(tokens)} tokens do not fit in the context window of {self.n_ctx}; shorten the prompt "
                f"or load the model with a larger n_ctx (max {self.spec.context_length}), or pass context_shift=True "
                "(--context-shift) to drop the oldest turns"
            )
        bad = [t for t in tokens if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise OndeviceError(f"token id {bad[0]} is outside the vocabulary (size {self.spec.vocab_size})")
        common = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        memo = self._prompt_logits
        if not all_logits and common >= len(tokens) and memo is not None and memo[0] == len(tokens):
            # The same prompt again (a retry, a regenerate): reuse its logits instead of re-evaluating the last
            # token alone, which would round differently from the batched prefill and could flip a near-tie.
            self._cached = list(tokens)
            return memo[1], len(tokens)
        common = min(common, len(tokens) - 1)  # always evaluate at least one token to get logits
        self._cached = self._cached[:common]
        logits = self.transformer.forward(np.asarray(tokens[common:], np.int32), common, all_logits=all_logits)
        self._cached = list(tokens)
        self._prompt_logits = None if all_logits else (len(tokens), logits)
        return logits, common

    def _step(self, token: int) -> np.ndarray:
        """Decode one token after the cached ones."""
        return self._verify([token])[0]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits (len(tokens), vocab) for every position, for evaluation (perplexity, KL)."""
        if not tokens:
            raise OndeviceError("logits() needs at least one token")
        self.reset()
        logits, _ = self._eval(list(tokens), all_logits=True)
        return logits

    def reset(self) -> None:
        self._cached = []
        self._dropped = Dropped()
        self._prompt_logits = None

    # ------------------------------------------------------------------ context shift
    def _shifted_prompt(self, tokens: list[int], keep: int, room: int) -> list[int]:
        """The prompt as the (shifted) cache holds it, shifted further until `room` tokens fit after it."""
        shortened, held = shorten_prompt(self.transformer, 0, self._cached, self._dropped, tokens, keep, room,
                                         self.n_ctx)
        if held is not self._cached:  # a new list: the prompt was shortened further, so the cache changed
            self._cached = held
            self._prompt_logits = None
        return shortened

    def _shift_cache(self, keep: int) -> None:
        """The cache is full mid-reply: drop the oldest half after the kept tokens."""
        self._cached = shift_full_slot(self.transformer, 0, self._cached, self._dropped, keep, self.n_ctx)
        self._prompt_logits = None

    @property
    def kv_bytes_per_position(self) -> int | None:
        """K and V bytes one token occupies in this model's cache (None when the backend keeps its own cache)."""
        k, v = (getattr(self.transformer, name, None) for name in ("k_cache", "v_cache"))
        if not isinstance(k, np.ndarray) or not isinstance(v, np.ndarray):
            return None
        return (k.nbytes + v.nbytes) // self.transformer.n_ctx

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | list[dict[str, str]], *args: Any, **kwargs: Any) -> Iterator[str]:
        """Stream text pieces. `prompt` is raw text or chat messages ({"role", "content"} dicts); the other
        arguments are prepare()'s (sampling, stops, structured output, speculation, tools)."""
        request = self.prepare(prompt, *args, **kwargs)
        return self._generate(request.tokens, request.max_tokens, request.sampler, request.stops,
                              request.token_filter, request.speculate, request.shift_keep)

    def generate_many(self, prompts: list[str | list[dict[str, str]]], *, parallel: int | None = None,
                      **kwargs: Any) -> list[str]:
        """Whole replies to several prompts, decoded together in one batch (ondevice.runtime.batch): each step
        evaluates one token of every unfinished reply in one pass through the weights. `parallel`: the sequences
        held at once (default: all of them); the keyword arguments are generate()'s and apply to every prompt.
        With temperature 0 each reply is the one generate() gives for its prompt alone."""
        from ondevice.runtime.batch import Batch

        if not prompts:
            return []
        batch = Batch(self, parallel or len(prompts))
        sequences = [batch.submit(prompt, **kwargs) for prompt in prompts]
        while batch.busy:
            batch.step()
        return [seq.text for seq in sequences]

    def prepare(
        self,
        prompt: str | list[dict[str, str]],
        max_tokens: int = DEFAULTS.max_tokens,
        temperature: float = DEFAULTS.temperature,
        top_k: int = DEFAULTS.top_k,
        top_p: float = DEFAULTS.top_p,
        min_p: float = DEFAULTS.min_p,
        repeat_penalty: float = DEFAULTS.repeat_penalty,
        seed: int | None = None,
        stop: list[str] | str | None = None,
        token_filter: Any = None,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        speculate: str | None = None,  # None: DEFAULT_SPECULATE ("grammar")
        max_string_tokens: int | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        context_shift: bool = False,
        logit_bias: dict[int, float] | None = None,
    ) -> Request:
        """A request checked and tokenized for generation (generate() streams it, a Batch decodes it with others).

        Structured output: `json_schema` (dict, JSON text or path), `regex` or `grammar` (Lark) constrain every
        sampled token, at any temperature, so the reply always parses (ondevice.structured, llguidance).
        `token_filter` is the lower-level hook: an object with allowed() -> bool mask, accept(token),
        is_finished(). `max_string_tokens` ends each JSON string after that many tokens of content. The token
        limit never cuts a structured reply: it is closed in time (stats: finish_reason "length",
        closed_at_limit).

        `speculate` (ondevice.runtime.speculative): "grammar" drafts the tokens a schema or tool grammar forces,
        "lookup" also tokens copied from the prompt by n-gram match, "draft" also the greedy tokens of the draft
        model given to load(..., draft=); a draft is verified in one forward pass with
        the pending token. The output is identical to plain decoding (same logits, same sampler, same random
        stream); only the speed changes. Default (None): "grammar", which only acts under a schema or tools;
        "off": plain decoding.

        `tools` (OpenAI's shape) with `tool_choice` "auto" (default), "required", "none" or
        {"type": "function", "function": {"name": ...}}: the reply is either text or
        `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls generated under a grammar, so the name is
        a declared one and the arguments validate (ondevice.tools; `parse_tool_calls` reads them). Messages may
        hold assistant `tool_calls` and `role: "tool"` results.

        `context_shift`: when the conversation outgrows n_ctx, keep the system prompt (the first tokens) and drop
        the oldest half of the rest, re-rotating the cached keys instead of recomputing (a follow-up turn that
        repeats the conversation maps onto the shifted cache); the reply goes on instead of stopping. Off by default.

        `logit_bias` ({token id: bias in [-100, 100]}, OpenAI's): added to those logits before sampling; -100 bans
        the token (e.g. the end tokens, `model.codec.eos_ids`, for a reply that runs to max_tokens).
        """
        template_vars: dict[str, Any] = {}
        uses_tools = not isinstance(prompt, str) and any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in prompt)
        if tools is not None or tool_choice is not None or uses_tools:
            prompt, template_vars, tool_rules = self.tool_prompt(prompt, tools, tool_choice, parallel_tool_calls)
            if tool_rules is not None:
                if token_filter is not None or json_schema is not None or regex is not None:
                    raise OndeviceError("give either tools or json_schema/regex/grammar/token_filter, not both")
                grammar = tool_rules
        if json_schema is not None or regex is not None or grammar is not None:
            if token_filter is not None:
                raise OndeviceError("give either token_filter or json_schema/regex/grammar, not both")
            from ondevice.structured import TokenFilter

            token_filter = TokenFilter(self, json_schema=json_schema, regex=regex, grammar=grammar,
                                       max_string_tokens=max_string_tokens)
        elif max_string_tokens is not None:
            raise OndeviceError("max_string_tokens needs json_schema, regex, grammar or tools")
        if max_tokens < 0:
            raise OndeviceError(f"max_tokens must be >= 0, got {max_tokens}")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed,
                                         logit_bias=logit_bias_pairs(logit_bias, self.spec.vocab_size)))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        speculate = check_speculate(speculate)
        if speculate == "draft" and self.draft_model is None:
            raise OndeviceError('speculate="draft" needs a draft model: ondevice.load(MODEL, draft=SMALLER_MODEL)')
        tokens = self.prompt_tokens(prompt, **template_vars)
        keep = self._shift_keep(prompt, tokens, template_vars) if context_shift else None
        return Request(tokens, max_tokens, sampler, stops, token_filter, speculate, keep)

    def _shift_keep(self, prompt: Any, tokens: list[int], template_vars: dict[str, Any]) -> int:
        """Tokens a context shift never drops: the system message as the template renders it, else the BOS."""
        if not hasattr(self.transformer, "shift"):
            raise OndeviceError("context_shift needs ondevice's own runtime (a GGUF model)")
        keep = 1 if tokens and tokens[0] == self.codec.bos_id else 0
        if not isinstance(prompt, str) and prompt and prompt[0].get("role") == "system":
            keep = max(keep, common_prefix(self.prompt_tokens(prompt[:1], **template_vars), tokens))
        if keep >= self.n_ctx // 2:
            raise ContextOverflowError(f"context shift keeps the first {keep} tokens (the system prompt), half the "
                                       f"context window of {self.n_ctx} or more; shorten it or raise n_ctx")
        return keep

    def tool_prompt(self, prompt: Any, tools: Any, tool_choice: Any,
                     parallel: bool) -> tuple[list[dict], dict[str, Any], str | None]:
        """(messages as the template gets them, template variables, the reply's grammar or None)."""
        from ondevice import tools as T

        if isinstance(prompt, str):
            raise OndeviceError("tools need chat messages, not a plain prompt string")
        checked = T.check_tools(tools) if tools is not None else []
        if tool_choice is not None and not checked:
            raise OndeviceError("tool_choice needs tools")
        mode, name = T.check_tool_choice(tool_choice, checked)
        native = T.template_takes_tools(self.chat_template)
        messages = T.render_messages(prompt, checked, native)
        template_vars = {"tools": T.openai_tools(checked)} if native and checked else {}
        rules = T.tool_grammar(checked, mode, name, parallel) if checked else None
        return messages, template_vars, rules

    @property
    def draft_limit(self) -> int:
        """Draft tokens one verification pass may check: the backend computes `exact_rows` rows per forward
        with the same numbers as single-token steps (0 = the backend cannot, so no speculation)."""
        return max(0, int(getattr(self.transformer, "exact_rows", 1)) - 1)

    def _generate(self, tokens: list[int], max_tokens: int, sampler: Sampler, stops: list[str],
                  token_filter: Any, speculate: str | None = None, shift_keep: int | None = None) -> Iterator[str]:
        stats = GenerationStats(prompt_tokens=len(tokens))
        self.last_stats = stats
        if max_tokens == 0:
            stats.finish_reason = "length"
            return
        if hasattr(token_filter, "start_budget"):  # structured output: fail now if it cannot fit, else close in time
            token_filter.start_budget(max_tokens)
        start = time.perf_counter()
        history = list(tokens)
        if shift_keep is not None:
            tokens = self._shifted_prompt(tokens, shift_keep, min(max_tokens, self.n_ctx // 4))
        elif self._dropped.tokens:
            self._dropped = Dropped()  # this prompt is not the shifted conversation's continuation
        logits, stats.cached_tokens = self._eval(tokens)
        if shift_keep is not None:
            stats.cached_tokens += len(history) - len(tokens)  # the dropped tokens cost nothing either
        stats.prefill_s = time.perf_counter() - start
        # with context shift the reply never stops for the window: the cache shifts instead
        decoding = Decoding(stats, sampler, history, self.codec, StopMatcher(stops), max_tokens, token_filter,
                            self.n_ctx if shift_keep is None else sys.maxsize, start)
        try:
            yield from self._decode_loop(decoding, logits, speculate or "off", shift_keep)
        except (GeneratorExit, KeyboardInterrupt):  # the caller closed the stream (a Stop button, Ctrl-C)
            stats.finish_reason = stats.finish_reason or "stopped"
            raise
        finally:
            if stats.first_token_at:
                stats.decode_s = time.perf_counter() - stats.first_token_at

    def _decode_loop(self, decoding: Decoding, logits: np.ndarray, speculate: str = "off",
                     shift_keep: int | None = None) -> Iterator[str]:
        stats, history = decoding.stats, decoding.history
        lookup = PromptLookup() if speculate == "lookup" else None
        draft_model = self.draft_model if speculate == "draft" else None
        forced = getattr(decoding.token_filter, "forced_tokens", None) if speculate != "off" else None
        k = min(self.draft_limit, 8) if (lookup, draft_model, forced) != (None, None, None) else 0
        guess_length = DraftLength(k)  # how far lookup / a draft model guess: adapts to how much is accepted
        rows = [logits]  # logits to sample the next tokens from, in order
        drafts: list[int] = []  # drafts[i]: the token rows[i + 1] was computed after (in the cache, unconfirmed)
        try:
            while True:
                text, more = decoding.take(rows.pop(0))
                if text:
                    yield text
                if not more:
                    break
                token = history[-1]
                if drafts and drafts[0] == token:  # the draft guessed it: its logits are already computed
                    drafts.pop(0)
                    stats.accepted_tokens += 1
                    guess_length.accepted()
                    continue
                self._drop_drafts(drafts)
                # never draft past the token budget or the context window
                room = min(k, decoding.max_tokens - stats.generated_tokens - 1, self.n_ctx - len(self._cached) - 2)
                drafts = []
                if room > 0 and forced is not None:  # structured output: what the grammar forces comes first
                    drafts = forced(room)
                guesses = min(room, guess_length.next())
                if guesses > 0 and not drafts and lookup is not None:
                    drafts = guess_length.drafted(lookup.draft(history, guesses))
                if guesses > 0 and not drafts and draft_model is not None:
                    drafts = guess_length.drafted(model_draft(draft_model, history, guesses))
                stats.drafted_tokens += len(drafts)
                stats.forward_passes += 1
                if shift_keep is not None and len(self._cached) + 1 + len(drafts) > self.n_ctx:
                    self._shift_cache(shift_keep)
                rows = self._verify([token, *drafts])
        finally:
            self._drop_drafts(drafts)  # the cache keeps only tokens that are in the history
        tail = decoding.tail()
        if tail:
            yield tail

    def _verify(self, tokens: list[int]) -> list[np.ndarray]:
        """Evaluate tokens after the cached ones in one pass; the logits after each of them."""
        pos = len(self._cached)
        if len(tokens) == 1:
            out = [self.transformer.forward(np.asarray(tokens, np.int32), pos)]
        else:
            out = list(self.transformer.forward(np.asarray(tokens, np.int32), pos, all_logits=True))
        self._cached.extend(tokens)
        return out

    def _drop_drafts(self, drafts: list[int]) -> None:
        """Roll the KV cache back over draft tokens that were not accepted. The cache is indexed by position, so
        forgetting them is enough: the next pass overwrites their K/V rows, and attention never reads past the
        last evaluated position."""
        if drafts:
            del self._cached[-len(drafts):]
            drafts.clear()

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        """Generate a whole reply (non-streaming convenience)."""
        return "".join(self.generate(messages, **kwargs))

    def close(self) -> None:
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None
        self.transformer = None
        self.weights = None
        if self._gguf is not None:
            self._gguf.close()

    def __repr__(self) -> str:
        spec = self.spec
        kind = f"{spec.arch}, {spec.n_layers} layers, width {spec.hidden_size}, vocab {spec.vocab_size}"
        state = "closed" if self.transformer is None else f"n_ctx={self.n_ctx}, threads={self.threads}"
        return f"<ondevice.LanguageModel {Path(self.path).name!r} ({kind}; {state})>"

    def __enter__(self) -> LanguageModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# generate() takes prepare()'s parameters: show them (and their defaults) in help() and editors
LanguageModel.generate.__signature__ = inspect.signature(LanguageModel.prepare).replace(  # type: ignore[attr-defined]
    return_annotation="Iterator[str]")
