"""splice.engine.output: incremental detokenization, stop strings with hold-back, EOS ids."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from splice.engine.output import Detokenizer, TextOutput, TokenTexts, eos_ids, stop_hold
from tests.tiny import build_tiny_tokenizer

TEXT = "héllo 世界 🙂 the end"


class CountingTokenizer:
    """Wraps a tokenizer, recording how many ids each ``decode`` call gets."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.lengths = inner, []  # type: list[int]

    def decode(self, ids: list[int], **kw: Any) -> str:
        self.lengths.append(len(ids))
        return str(self.inner.decode(ids, **kw))


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style word tokenizer: "▁world" decodes to "world" alone, " world" after a word."""
    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "▁again": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_deltas_add_up_to_the_decoded_output_and_wait_for_whole_characters() -> None:
    tokenizer = build_tiny_tokenizer()
    prompt = tokenizer("say:")["input_ids"]
    output = tokenizer(TEXT)["input_ids"]
    counting = CountingTokenizer(tokenizer)
    detokenizer = Detokenizer(counting, prompt)
    deltas = [detokenizer.push(token) for token in output]
    assert "".join(deltas) + detokenizer.flush() == TEXT == tokenizer.decode(output)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[2] == "é"  # two byte tokens, one character
    assert max(counting.lengths) <= 8  # short windows, never the whole output


def test_first_token_gets_its_leading_space_from_the_prompt() -> None:
    tokenizer = _metaspace_tokenizer()
    assert tokenizer.decode([2]) == "world"
    detokenizer = Detokenizer(tokenizer, [1])  # "hello"
    assert [detokenizer.push(t) for t in (2, 3)] == [" world", " again"]
    assert Detokenizer(tokenizer, []).push(2) == "world"  # no prompt: nothing to separate from


def test_flush_gives_an_incomplete_character_at_the_end() -> None:
    tokenizer = build_tiny_tokenizer()
    first_byte = tokenizer("é")["input_ids"][0]
    detokenizer = Detokenizer(tokenizer, [])
    assert detokenizer.push(first_byte) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""


@pytest.mark.parametrize(("text", "stops", "held"), [
    ("abc", ("cd",), 1), ("abc", ("bcd", "c"), 2), ("abc", ("xy",), 0), ("a", ("abc",), 1), ("", ("ab",), 0),
    ("xab", ("ab",), 0),  # a whole stop string is found, not held
])
def test_stop_hold_is_the_longest_suffix_that_may_grow_into_a_stop(text: str, stops: tuple[str, ...],
                                                                  held: int) -> None:
    assert stop_hold(text, stops) == held


def _stream(output: TextOutput, tokenizer: Any, text: str) -> tuple[list[str], bool]:
    deltas = []
    for token in tokenizer(text)["input_ids"]:
        delta, hit = output.push(token)
        deltas.append(delta)
        if hit:
            return deltas, True
    return deltas, False


def test_stop_strings_cut_the_text_and_nothing_streamed_is_taken_back() -> None:
    tokenizer = build_tiny_tokenizer()
    output = TextOutput(tokenizer, [], stop=("世界", "zzz"))
    deltas, hit = _stream(output, tokenizer, TEXT)
    assert hit and output.text == "héllo " and "".join(deltas) == "héllo "
    # A possible stop prefix is held back, then released when it stops matching.
    output = TextOutput(tokenizer, [], stop=("the end!",))
    deltas, hit = _stream(output, tokenizer, TEXT)
    assert not hit and "".join(deltas) == "héllo 世界 🙂 "  # " the end" might still become the stop
    assert output.finish() == ("the end", False)
    # The earliest of several stops wins, also when a later-listed one starts first.
    output = TextOutput(tokenizer, [], stop=("end", "llo"))
    deltas, hit = _stream(output, tokenizer, TEXT)
    assert hit and output.text == "hé"


def test_a_stop_completed_by_the_flushed_text_still_cuts() -> None:
    tokenizer = build_tiny_tokenizer()
    output = TextOutput(tokenizer, [], stop=("é",))
    first, second = tokenizer("aé")["input_ids"][-2:]
    assert output.push(tokenizer("a")["input_ids"][0]) == ("a", False)
    assert output.push(first) == ("", False)
    assert output.push(second) == ("", True) and output.text == "a"


def test_eos_ids_from_generation_config_and_tokenizer() -> None:
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 7]))
    assert eos_ids(model, SimpleNamespace(eos_token_id=2)) == {2, 5, 7}  # type: ignore[arg-type]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))
    assert eos_ids(model, SimpleNamespace(eos_token_id=None)) == {9}  # type: ignore[arg-type]
    assert eos_ids(SimpleNamespace(), SimpleNamespace()) == set()  # type: ignore[arg-type]


def test_token_texts_give_each_tokens_bytes_and_openais_text() -> None:
    tokenizer = build_tiny_tokenizer()
    texts = TokenTexts(tokenizer)
    ids = tokenizer(TEXT)["input_ids"]
    pieces = [texts(i) for i in ids]
    assert b"".join(data for _, data in pieces) == TEXT.encode()  # byte-level: every byte, once, in order
    assert pieces[1] == ("bytes:\\xc3", b"\xc3") and pieces[2] == ("bytes:\\xa9", b"\xa9")  # half an "é"
    the = tokenizer.convert_tokens_to_ids("Ġthe")
    assert texts(the) == (" the", b" the") and texts(2) == ("<|im_end|>", b"<|im_end|>")
    # SentencePiece: "▁" is a space, and byte fallbacks are their byte.
    vocab = {"<unk>": 0, "▁hello": 1, "world": 2, "<0xE2>": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    pieces_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    sentencepiece = TokenTexts(pieces_tokenizer)
    assert [sentencepiece(i) for i in (1, 2, 3)] == [(" hello", b" hello"), ("world", b"world"),
                                                      ("bytes:\\xe2", b"\xe2")]
    backend.decoder = None  # no decoder at all (a bare word-level tokenizer): each token decoded alone
    bare = TokenTexts(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>"))
    assert bare(2) == ("world", b"world")
