"""Preference pairs: checks that name the row, TRL's tokenization, batches and rank shares."""

from __future__ import annotations

import pytest

from splice.data.preference import (
    Pair,
    check_pairs,
    pair_batch,
    pair_batches,
    pair_template,
    tokenize_pairs,
    wrong_shape,
)
from splice.data.rows import ChatTemplate, PromptTemplate

TEXT = {"prompt": "Q: the name?\nA: ", "chosen": "return name", "rejected": "def"}
CHAT = {"prompt": [{"role": "user", "content": "the name?"}], "chosen": [{"role": "assistant", "content": "name"}],
        "rejected": [{"role": "assistant", "content": "the"}]}


@pytest.mark.parametrize(("row", "says"), [
    ({"prompt": "a", "chosen": "b"}, "row 2: the row has no rejected"),
    ({"prompt": "a", "chosen": "b", "rejected": None}, "row 2: 'rejected' holds NoneType"),
    ({**CHAT, "chosen": "name"}, "row 2: 'chosen' holds str; with chat-message rows it must be a non-empty list"),
    ({**CHAT, "chosen": [{"role": "user", "content": "x"}]}, "row 2: chosen[0] has role 'user'"),
    ({**CHAT, "prompt": [{"role": "assistant", "content": "x"}]}, "row 2: the prompt ends with a 'assistant'"),
])
def test_bad_rows_are_named(row: dict, says: str) -> None:
    first = CHAT if isinstance(row.get("prompt"), list) else TEXT
    with pytest.raises(ValueError, match="pairs.jsonl, " + says.replace("(", r"\(").replace("[", r"\[")):
        check_pairs([first, row], where="pairs.jsonl")


def test_mixed_shapes_and_wrong_columns_are_named() -> None:
    with pytest.raises(ValueError, match="pairs.jsonl, row 2: its prompt is chat messages but row 1's is text"):
        check_pairs([TEXT, CHAT], where="pairs.jsonl")
    problem = wrong_shape({"prompt", "completion"}, "sft.jsonl")
    assert problem is not None and problem.startswith("sft.jsonl: --method dpo needs prompt, chosen and rejected")
    assert "missing chosen, rejected" in problem and "--method sft" in problem
    assert wrong_shape({"prompt", "chosen", "rejected", "id"}, "x") is None
    assert isinstance(pair_template([TEXT]), PromptTemplate)
    assert isinstance(pair_template([CHAT]), ChatTemplate)
    assert pair_template([CHAT]).render(CHAT)[-1] == {"role": "assistant", "content": "name"}


def test_text_pairs_tokenize_as_trl(tiny_tokenizer) -> None:
    """Prompt alone and prompt + answer + eos tokenized whole; the answers start where they differ."""
    pair = tokenize_pairs([TEXT], tiny_tokenizer, max_length=64).pairs[0]
    eos = tiny_tokenizer.eos_token
    full_chosen = tiny_tokenizer(TEXT["prompt"] + TEXT["chosen"] + eos)["input_ids"]
    assert pair.prompt + pair.chosen == full_chosen
    assert pair.prompt + pair.rejected == tiny_tokenizer(TEXT["prompt"] + TEXT["rejected"] + eos)["input_ids"]
    assert pair.chosen[-1] == pair.rejected[-1] == tiny_tokenizer.eos_token_id
    # "A: " + "return": byte-level BPE merges the space into " return", so the prompt loses its last token
    assert pair.prompt == tiny_tokenizer(TEXT["prompt"])["input_ids"][:-1]
    assert tiny_tokenizer.decode(pair.chosen) == " return name" + eos


def test_chat_pairs_tokenize_through_the_template(tiny_tokenizer) -> None:
    pair = tokenize_pairs([CHAT], tiny_tokenizer, max_length=200).pairs[0]
    prompt = tiny_tokenizer.apply_chat_template(CHAT["prompt"], tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(pair.prompt) == prompt
    assert tiny_tokenizer.decode(pair.chosen) == "name<|im_end|>\n"
    assert tiny_tokenizer.decode(pair.rejected) == "the<|im_end|>\n"


def test_long_rows_are_cut_or_dropped(tiny_tokenizer) -> None:
    long = {**TEXT, "chosen": "name " * 40}
    result = tokenize_pairs([TEXT, long, {**TEXT, "prompt": "x" * 80}], tiny_tokenizer, max_length=24)
    assert (len(result.pairs), result.truncated, result.dropped) == (2, 1, 1)
    assert all(len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 24 for p in result.pairs)
    with pytest.raises(ValueError, match="all 1 pairs were dropped"):
        tokenize_pairs([{**TEXT, "prompt": "x" * 80}], tiny_tokenizer, max_length=24)


def test_batch_layout() -> None:
    pairs = [Pair([1, 2], [3], [4, 5], ref=(-1.0, -2.0)), Pair([6], [7, 8, 9], [10], ref=(-3.0, -4.0))]
    batch = pair_batch(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 5], [6, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, -100], [-100, 7, 8, 9], [-100, -100, 4, 5],
                                        [-100, 10, -100, -100]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 4, 4, 2]
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]  # chosen ones, then rejected ones
    assert batch["pair_weight"].tolist() == [1.0, 1.0] and int(batch["num_tokens"]) == 13
    assert "ref_logps" not in pair_batch([Pair([1], [2], [3])], pad_id=0)


def test_rank_shares_are_the_global_batches() -> None:
    pairs = [Pair([i], [i + 100], [i + 200]) for i in range(7)]
    whole = pair_batches(pairs, batch_size=4, pad_id=0, seed=3, epoch=1)
    shares = [pair_batches(pairs, batch_size=2, pad_id=0, seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 2
    for i, batch in enumerate(whole):
        chosen = batch["input_ids"][: len(batch["pair_weight"]), 0].tolist()
        got = [s[i]["input_ids"][: len(s[i]["pair_weight"]), 0].tolist() for s in shares]
        assert got[0] + got[1] == chosen
    assert pair_batches(pairs, batch_size=4, pad_id=0, seed=3, epoch=2)[0]["input_ids"].tolist() != \
        whole[0]["input_ids"].tolist()  # another epoch, another order
    # 3 pairs on 4 ranks: rank 0's share is empty, it steps on a placeholder pair that counts for nothing
    empty = pair_batches(pairs[:3], batch_size=1, pad_id=0, seed=0, epoch=0, rank=0, world=4)[0]
    assert empty["pair_weight"].tolist() == [0.0] and int(empty["num_tokens"]) == 0
