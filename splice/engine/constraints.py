"""Structured output: a grammar the generated text must match, enforced token by token while decoding.

A :class:`Constraint` says what the output must be: a JSON value matching a JSON schema
(:func:`json_schema`), any JSON object (:func:`json_object`), a full match of a regular expression
(:func:`regex`) or one of a few strings (:func:`choice`). Give it as ``SamplingParams(constraint=...)``.
It holds no tokenizer: an engine's :class:`Grammars` compiles it for its own tokenizer (once per distinct
spec, an LRU keyed by the spec's canonical JSON) and gives each request its own :class:`Matcher`, the
parser state after the tokens it accepted so far.

Each step, :meth:`Grammars.masks` asks every constrained row's matcher which tokens may come next and
returns an ``(S, V)`` bool mask (True = allowed; unconstrained rows all True, ids past the tokenizer's
vocabulary, such as a model's padding rows, never allowed); the sampler sets the other logits to
``-inf`` before any other processing, so greedy and sampled rows alike can only pick an allowed token,
and a model with random weights still produces valid output. After a token is accepted the matcher
advances; once nothing but EOS may follow, the request stops (``finish_reason`` "stop"). EOS is allowed
only where the grammar is complete. A request that reaches ``max_tokens`` first ends with "length" and
its text is a prefix of a valid output, not a valid output.

Masks are computed on the host (llguidance, rows in parallel on its thread pool) into
a persistent int32 bit buffer (pinned on CUDA), sent with one non-blocking copy and unpacked on the device
(:func:`unpack_bitmask`). The engine computes them after launching the step's forward and before the
sampler: on CUDA the forward runs asynchronously, so the host work overlaps the GPU's (a mask for step N
only needs the tokens accepted up to step N-1). The copy's event is waited on before the buffer is
rewritten.

Why llguidance (PyPI ``llguidance``; also vLLM's and SGLang's backend): one abi3 wheel with no
dependencies; JSON schema, regex and Lark grammars in one Earley parser with a lazy lexer, so a new schema
compiles in under a millisecond and a mask takes tens of microseconds (measured with SmolLM2's 49,152-token
tokenizer: 0.3 s to build its llguidance view once, ~0.6 ms to compile a schema, 10-20 µs a mask).
xgrammar pulls torch/triton/transformers of its own and compiles every schema ahead of use; outlines-core
builds a regex-to-FSM index over the whole vocabulary, which can be slow for large schemas.
The tokenizer must be a Hugging Face fast one with an EOS token.

JSON whitespace between tokens is limited to :data:`JSON_WHITESPACE` (at most 24 spaces, tabs or newlines
at a time: pretty printing fits, while a model that keeps emitting whitespace, as small or untrained
models do, cannot loop forever) unless the schema's own ``"x-guidance"`` options set ``whitespace_flexible``
(false: no whitespace at all) or ``whitespace_pattern``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from splice.core.device import to_device
from splice.core.errors import one_line

__all__ = ["JSON_WHITESPACE", "Constraint", "Grammars", "Matcher", "choice", "json_object", "json_schema",
           "regex", "unpack_bitmask"]

JSON_WHITESPACE = r"[\x20\x09\x0A\x0D]{0,24}"  # between JSON tokens (see module docstring)
_INSTALL = "structured output needs llguidance: pip install 'splice[serve]' (or pip install llguidance)"


def _llguidance() -> Any:
    """The llguidance module (imported on first use: unconstrained generation never needs it)."""
    try:
        import llguidance
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the output must match (make one with :func:`json_schema`, :func:`json_object`, :func:`regex` or
    :func:`choice`): ``kind``, ``spec`` (the canonical JSON of what was asked: the compile cache's key) and
    ``grammar`` (llguidance's grammar text). Immutable and hashable."""

    kind: str
    spec: str
    grammar: str = field(repr=False, compare=False)  # follows from spec


def _checked(kind: str, value: Any, grammar: str) -> Constraint:
    """A Constraint, once llguidance accepts ``grammar`` (without a tokenizer); else one-line ValueError."""
    failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, None)
    if failed:
        raise ValueError(f"{kind}: {one_line(messages[0] if messages else 'invalid grammar')}")
    spec = json.dumps({"kind": kind, "value": value}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Constraint(kind=kind, spec=spec, grammar=grammar)


def json_schema(schema: Mapping[str, Any] | str) -> Constraint:
    """Output: JSON matching ``schema`` (a dict, or its JSON text). ValueError naming the problem for text
    that is not JSON, a schema that is not an object, or one llguidance refuses (an unknown type, a bad
    ``pattern``, a ``$ref`` to nothing)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"json_schema: the schema is not valid JSON ({error})") from None
    if not isinstance(schema, Mapping):
        raise ValueError(f"json_schema: a JSON schema is a JSON object, got {type(schema).__name__}")
    return _json("json_schema", dict(schema))


def json_object() -> Constraint:
    """Output: any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
    return _json("json_object", {"type": "object"})


def _json(kind: str, schema: dict[str, Any]) -> Constraint:
    own = schema.get("x-guidance")
    whitespace = isinstance(own, Mapping) and bool({"whitespace_flexible", "whitespace_pattern"} & set(own))
    matcher = _llguidance().LLMatcher
    try:
        grammar = matcher.grammar_from_json_schema(
            schema, defaults=None if whitespace else {"whitespace_pattern": JSON_WHITESPACE})
    except (ValueError, TypeError) as error:  # e.g. a value JSON cannot hold
        raise ValueError(f"{kind}: {one_line(str(error))}") from None
    return _checked(kind, schema, grammar)


def regex(pattern: str) -> Constraint:
    """Output: a full match of ``pattern`` (Rust ``regex`` syntax: Python's, without look-around and
    backreferences). ValueError naming the error for a pattern that does not parse."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"regex: give a non-empty pattern string, got {pattern!r}")
    return _checked("regex", pattern, _llguidance().LLMatcher.grammar_from_regex(pattern))


def choice(options: Sequence[str]) -> Constraint:
    """Output: exactly one of ``options`` (non-empty strings; at least one)."""
    if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"choice: give a non-empty list of non-empty strings, got {options!r}")
    # A Lark alternation of string literals (JSON escapes are Lark's too), as llguidance's grammar_from does.
    lark = "start: " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
    return _checked("choice", list(options), _llguidance().LLMatcher.grammar_from_lark(lark))


class Matcher:
    """One request's position in its grammar (llguidance's ``LLMatcher``)."""

    def __init__(self, inner: Any, constraint: Constraint) -> None:
        self.inner, self.constraint = inner, constraint

    def copy(self) -> Matcher:
        """An independent matcher in the same state (a forked sequence continues from here)."""
        return Matcher(self.inner.deep_copy(), self.constraint)

    def advance(self, token: int) -> str | None:
        """Take the accepted ``token``; None, or one line saying why the grammar refused it (the request
        then ends with an error: a masked sampler never picks such a token)."""
        if not self.inner.is_error() and self.inner.consume_token(token):  # an error state is for good
            return None
        return f"{self.constraint.kind}: token {token} broke the grammar ({one_line(self.inner.get_error())})"

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow: the output is complete."""
        return bool(self.inner.is_stopped() and not self.inner.is_error())


def unpack_bitmask(packed: Tensor, vocab: int) -> Tensor:
    """``packed`` (C, W) int32, bit ``j % 32`` of word ``j // 32`` set iff token ``j`` is allowed ->
    (C, vocab) bool; ids at or past ``32 * W`` are not allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # (C, 32 W)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)


class Grammars:
    """An engine's grammar machinery for ``tokenizer`` (a transformers fast tokenizer): its llguidance
    tokenizer (built once, on first use), compiled grammars (an LRU of ``cache_size`` specs; a request
    gets a copy) and the step's mask buffer. ``eos``: the engine's EOS ids, allowed where a grammar is
    complete. Thread-safe: serve compiles on its worker thread, the engine copies on its own."""

    def __init__(self, tokenizer: Any, *, eos: Collection[int] = (), cache_size: int = 128) -> None:
        if cache_size < 1:
            raise ValueError(f"Grammars: cache_size={cache_size}; it must be at least 1")
        self.tokenizer, self.eos, self.cache_size = tokenizer, sorted(eos), cache_size
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # spec -> LLMatcher in its start state
        self._executor: Any = None
        self._packed: Tensor | None = None  # (rows, words) int32 host buffer of the step's bitmasks
        self._copied: torch.cuda.Event | None = None  # the buffer's last copy to the device

    @property
    def vocab_size(self) -> int:
        """Token ids the grammars know (the tokenizer's; a model's logits may be wider)."""
        return int(self._tokenizer().vocab_size)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._lltokenizer is None:
                lib = _llguidance()
                from llguidance.hf import from_tokenizer

                eos = self.eos or getattr(self.tokenizer, "eos_token_id", None)
                if eos is None:  # llguidance would take token 0 for EOS and keep it out of the output
                    raise ValueError("structured output needs an EOS token: the model and its tokenizer have "
                                     "none (set tokenizer.eos_token)")
                try:
                    self._lltokenizer = from_tokenizer(self.tokenizer, eos_token=eos)
                except (ValueError, TypeError, AttributeError) as error:
                    raise ValueError(f"structured output needs a Hugging Face fast tokenizer; "
                                     f"{type(self.tokenizer).__name__} cannot be used ({one_line(str(error))})"
                                     ) from None
                self._executor = lib.LLExecutor()
            return self._lltokenizer

    def compile(self, constraint: Constraint) -> Any:
        """``constraint``'s llguidance matcher in its start state (compiled once per spec; later calls
        reuse it). ValueError (one line) when the grammar does not compile for this tokenizer."""
        with self._lock:
            compiled = self._compiled.get(constraint.spec)
            if compiled is not None:
                self._compiled.move_to_end(constraint.spec)
                return compiled
        tokenizer = self._tokenizer()  # outside the lock: compiling can take a while for huge grammars
        lib = _llguidance()  # errors without the parser's state and grammar: they reach clients
        compiled = lib.LLMatcher(tokenizer, constraint.grammar, log_level=0,
                                 limits=lib.LLParserLimits(verbose_errors=False))
        if compiled.is_error():
            raise ValueError(f"{constraint.kind}: {one_line(compiled.get_error())}")
        with self._lock:
            self._compiled[constraint.spec] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher for one request."""
        return Matcher(self.compile(constraint).deep_copy(), constraint)

    def masks(self, matchers: Sequence[Matcher | None], *, vocab: int, device: torch.device) -> Tensor | None:
        """(S, vocab) bool on ``device``: row ``i`` allows what ``matchers[i]`` allows next (every token
        when it is None); None when no row is constrained (see module docstring)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        words = (self.vocab_size + 31) // 32
        packed = self._buffer(len(rows), words, pinned=device.type == "cuda")
        width = words * 4  # bytes a row
        pairs = [(m.inner, k) for k, m in enumerate(m for m in matchers if m is not None)]
        if len(pairs) == 1:
            pairs[0][0].unsafe_compute_mask_ptr(packed.data_ptr(), width)
        else:  # rows in parallel on llguidance's threads, the GIL released
            self._executor.unsafe_compute_mask_ptr(pairs, packed.data_ptr(), width, len(rows))
        if device.type == "cuda":
            on_device = packed.to(device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            on_device = packed.clone()
        allowed = unpack_bitmask(on_device, vocab)
        if len(rows) == len(matchers):
            return allowed
        index = to_device(rows, torch.long, device)
        full = torch.ones(len(matchers), vocab, dtype=torch.bool, device=device)
        return full.index_copy_(0, index, allowed)

    def _buffer(self, rows: int, words: int, *, pinned: bool) -> Tensor:
        """The first ``rows`` rows of the reused host buffer, all bits clear (grown when too small)."""
        if self._copied is not None:
            self._copied.synchronize()  # its last copy to the device has finished reading it
        buffer = self._packed
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != words or buffer.is_pinned() != pinned:
            buffer = torch.zeros(max(rows, 8), words, dtype=torch.int32, pin_memory=pinned)
            self._packed = buffer
        view = buffer[:rows]
        view.zero_()
        return view
