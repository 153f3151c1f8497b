"""Grammar compilation: a constraint (StructuredOutputsParams) → an xgrammar CompiledGrammar.

Compiling costs host time (about 2 ms for a 50-field JSON schema on SmolLM2's tokenizer, far
more for big schemas or grammars), so it never runs on the engine's step loop: `submit`
hands the work to one worker thread and returns a Future. Each distinct constraint compiles
once per tokenizer: the cache is keyed by the constraint's canonical key (a schema's keys
sorted, so equal schemas share an entry), holds failures too (the same bad schema fails
fast the second time) and forgets the least recently used entry past MAX_CACHED_GRAMMARS.

The server compiles in the request handler's path (`compile_blocking` on a thread, before
admission) so that a constraint that does not compile is answered with a 400; the engine
then finds the grammar ready in the cache.

xgrammar is optional (`pip install 'kiln[structured]'`): it is imported on first use only.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from kiln.structured.params import StructuredOutputsParams

INSTALL_HINT = "structured outputs need xgrammar: pip install 'kiln[structured]'"
# Compiled grammars kept; one holds per-token tables, a few MB for a big schema.
MAX_CACHED_GRAMMARS = 256
# Keywords xgrammar 0.2.9 compiles but does not enforce (checked: outputs that break them
# are accepted). A strict schema (OpenAI's `strict: true`) using one is refused, since the
# client was promised every output matches; a non-strict one is compiled without them.
UNENFORCED_KEYWORDS = ("not", "contains", "minContains", "maxContains")
# JSON is generated compactly (no free whitespace between tokens): a model that may put any
# whitespace anywhere can loop on newlines and spaces until max_tokens (vLLM added
# --disable-any-whitespace for this), and compact JSON parses the same.
ANY_WHITESPACE = False
# JSON forbids raw control characters (U+0000-U+001F) in strings, but xgrammar 0.2.9's rule
# for length-bounded strings (`maxLength`) lets them through, and a random model finds them.
# With compact JSON no valid output holds such a byte anywhere, so JSON rows also ban every
# token containing one (`control_token_ban`).
_CONTROL_BYTE = re.compile(rb"[\x00-\x1f]")
# xgrammar prefixes errors with "[hh:mm:ss] /path/file.cc:line: ": not the client's business.
_XGRAMMAR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class GrammarCompileError(ValueError):
    """The constraint does not compile (a bad regex, grammar or schema): the request's fault."""


def import_xgrammar():
    """The xgrammar module, or a ValueError naming the install command."""
    try:
        import xgrammar
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return xgrammar


# Keywords whose value maps names to subschemas (the names are not keywords), and keywords
# whose value is data (never a schema).
_NAMED_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions",
                     "dependentSchemas")
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "required")


def unenforced_keywords(schema: object) -> list[str]:
    """The UNENFORCED_KEYWORDS used as keywords anywhere in a schema, sorted (an iterative
    walk over subschemas: property names and enum values are not keywords)."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key in UNENFORCED_KEYWORDS:
                found.add(key)
            if key in _NAMED_SUBSCHEMAS and isinstance(value, dict):
                stack.extend(value.values())
            else:
                stack.append(value)
    return sorted(found)


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of the strings. json.dumps escapes quotes, backslashes and
    control characters the way xgrammar's string literals read them."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGRAMMAR_PREFIX.sub("", text)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and logits width, on one worker thread."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        """vocab_size: the model's logits width, which may exceed the tokenizer's vocabulary
        (padding): xgrammar masks the ids past the tokenizer's."""
        self.xgrammar = import_xgrammar()
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        # The grammar's vocabulary: the tokenizer's ids only. Ids past them (the logits'
        # padding) are masked by the manager, not by xgrammar, which treats each as a special
        # token to check on every row: at a 128,256-wide mask over a 49,152-token vocabulary a
        # 64-row JSON mask took 5.6 ms on one core instead of 0.7 ms.
        self.grammar_vocab_size = min(vocab_size, _num_token_ids(tokenizer))
        self._stop_token_ids = list(stop_token_ids)
        self._compiler = None  # built on the worker thread: reading the vocabulary takes time
        self.control_token_ban = None  # (ceil(V / 32),) int32, with the compiler
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-grammar")
        self.num_compiled = 0  # compilations run (cache misses), for tests and stats

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A Future of the CompiledGrammar (or of a GrammarCompileError); cached."""
        key = params.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._executor.submit(self._compile_checked, params)
            self._cache[key] = future
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return future

    def compile_blocking(self, params: StructuredOutputsParams):
        """submit(params).result(): for callers off the step loop (request handlers)."""
        return self.submit(params).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile_checked(self, params: StructuredOutputsParams):
        self.num_compiled += 1
        try:
            return self.compile(params)
        except GrammarCompileError:
            raise
        except Exception as error:  # xgrammar raises RuntimeError/ValueError on bad input
            raise GrammarCompileError(
                f"structured_outputs.{params.kind} does not compile: {_error_text(error)}"
            ) from None

    def compile(self, params: StructuredOutputsParams):
        """Runs on the worker thread (tests replace it to make compiles slow)."""
        compiler = self._grammar_compiler()
        kind = params.kind
        if kind == "json":
            return compiler.compile_json_schema(
                json.dumps(params.json), any_whitespace=ANY_WHITESPACE, strict_mode=True)
        if kind == "json_object":
            return compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=ANY_WHITESPACE, strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(params.regex)
        if kind == "choice":
            return compiler.compile_grammar(choice_grammar(params.choice))
        return compiler.compile_grammar(params.grammar)

    def _grammar_compiler(self):
        if self._compiler is None:
            xgr = self.xgrammar
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.grammar_vocab_size,
                stop_token_ids=self._stop_token_ids)
            # One compile at a time already (one worker); xgrammar's own threads parallelise
            # inside a compile. The cache is ours (keyed per constraint), not xgrammar's.
            self.control_token_ban = _control_token_ban(info.decoded_vocab, self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return self._compiler


def _num_token_ids(tokenizer) -> int:
    """One past the largest id the tokenizer can produce (its vocabulary and added tokens)."""
    return max(tokenizer.get_vocab().values()) + 1


def _control_token_ban(decoded_vocab: list[bytes], vocab_size: int):
    """A bitmask row allowing every token but those whose bytes hold a control character."""
    from kiln.structured.bitmask import allocate_token_bitmask

    ban = allocate_token_bitmask(1, vocab_size)[0]  # (W,) all allowed
    words = ban.numpy().view("uint32")
    for token_id, token_bytes in enumerate(decoded_vocab[:vocab_size]):
        if _CONTROL_BYTE.search(token_bytes):
            words[token_id // 32] &= ~(1 << (token_id % 32)) & 0xFFFFFFFF
    return ban
