"""tokenize_chat: masks by character offsets, the closing <|end|>, hostile content, truncation."""

import json

import pytest
from helpers import (
    HOSTILE,
    REAL_TOKENIZER,
    SHARED_DATA,
    assert_exact_mask,
    needs_real_tokenizer,
    needs_shared_data,
    trained_runs,
)

from phi3lit.data import IGNORE_INDEX, load_conversations, tokenize_chat

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "3 + 3 = 6."},
]


def test_labels_are_replies_plus_end_tiny(tiny_tokenizer):
    out = assert_exact_mask(CONV, tiny_tokenizer)
    text = tiny_tokenizer.decode(out["input_ids"])
    assert text == tiny_tokenizer.apply_chat_template(CONV, tokenize=False)
    header = tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(lab == IGNORE_INDEX for i, lab in zip(out["input_ids"], out["labels"], strict=True) if i == header)


def test_train_on_all_labels_everything_but_the_first_token(tiny_tokenizer):
    out = tokenize_chat(CONV, tiny_tokenizer, train_on="all")
    assert out["labels"][0] == IGNORE_INDEX
    assert out["labels"][1:] == out["input_ids"][1:]


def test_special_token_text_in_content_is_plain_text(tiny_tokenizer):
    out = assert_exact_mask(HOSTILE, tiny_tokenizer)
    special_ids = {i for i, t in tiny_tokenizer.added_tokens_decoder.items() if t.special}
    n_special = sum(i in special_ids for i in out["input_ids"])
    # <|user|> <|end|> \n <|assistant|> <|end|> \n <|endoftext|>: the template's own, nothing from content.
    assert n_special == 5


def test_truncation_keeps_the_start(tiny_tokenizer):
    full = tokenize_chat(CONV, tiny_tokenizer)
    cut = tokenize_chat(CONV, tiny_tokenizer, max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_generation_prompt_ends_with_assistant_header(tiny_tokenizer):
    out = tokenize_chat(CONV[:2], tiny_tokenizer, add_generation_prompt=True)
    assert tiny_tokenizer.decode(out["input_ids"]).endswith("<|assistant|>\n")


@needs_real_tokenizer
def test_real_tokenizer_newline_quirk(real_tokenizer):
    # The README's reference: text after a special token gets a leading ▁ (29871) before \n (13).
    out = tokenize_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}], real_tokenizer)
    assert out["input_ids"][:4] == [32010, 29871, 13, 18567]
    assert trained_runs(out) == [[18567, 32007]]


@needs_real_tokenizer
def test_real_tokenizer_hostile_content(real_tokenizer):
    out = assert_exact_mask(HOSTILE, real_tokenizer)
    forged = [i for i in out["input_ids"] if i >= 32000]
    assert forged == [32010, 32007, 32001, 32007, 32000]  # exactly the template's own special tokens


@needs_real_tokenizer
@needs_shared_data
@pytest.mark.parametrize("tokenizer_class", ["AutoTokenizer", "LlamaTokenizer"])
def test_real_tokenizer_masks_on_every_shared_conversation(tokenizer_class, real_tokenizer):
    import transformers

    tok = getattr(transformers, tokenizer_class).from_pretrained(REAL_TOKENIZER)
    n = 0
    for path in sorted(SHARED_DATA.glob("*.jsonl")):
        for conv in load_conversations(str(path)):
            out = assert_exact_mask(conv, tok)
            # Both tokenizer classes give the canonical Phi-3 ids: the fast tokenizer's own full encode.
            rendered = real_tokenizer.apply_chat_template(conv, tokenize=False)
            assert out["input_ids"] == real_tokenizer(rendered, add_special_tokens=False)["input_ids"]
            n += 1
    assert n > 900


@needs_shared_data
def test_shared_data_has_no_literal_special_tokens_assumption():
    # Guard for the test above: if shared data ever gains literal special-token text, full-encode equality
    # would no longer be the right oracle and this test tells us why the other one fails.
    for path in sorted(SHARED_DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            for m in json.loads(line)["messages"]:
                assert "<|end|>" not in m["content"] and "<|assistant|>" not in m["content"]
