"""Bad input, one test per case: hostile content (issue item 3) and overlong conversations (item 4).

Each asserts the exact message (on_bad_example: error) or the exact count (skip, truncate, drop).
"""

import json

import pytest
from helpers import HOSTILE, assert_exact_mask

from phi3lit.data import IGNORE_INDEX, ChatDataModule, DataError, load_conversations, tokenize_example

HINT = " (data.on_bad_example=skip skips and counts such examples)"


def user(text="Hi"):
    return {"role": "user", "content": text}


def bot(text="Hello."):
    return {"role": "assistant", "content": text}


GOOD = [user(f"What is {i} + 1?") for i in range(6)]
GOOD = [[u, bot(f"{i + 1}.")] for i, u in enumerate(GOOD)]


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def setup_dm(tmp_path, conversations, **kwargs):
    kwargs = {"val_fraction": 0.0, "max_length": 64, "cache_dir": str(tmp_path / "cache"), **kwargs}
    dm = ChatDataModule(write_jsonl(tmp_path / "d.jsonl", conversations), **kwargs)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------- item 3: content
def test_literal_special_token_text_is_plain_text_through_the_datamodule(tmp_path, tiny_path, tiny_tokenizer):
    dm = setup_dm(tmp_path, [HOSTILE], tokenizer=tiny_path, max_length=512)
    (conv,) = dm.rows["train"][0]
    assert conv.pop("source").endswith("d.jsonl:1")  # where it came from, for error messages
    assert conv == assert_exact_mask(HOSTILE, tiny_tokenizer)  # the mask is the replies + <|end|>, nothing forged


def test_non_text_content_part_is_an_error_naming_the_part(tmp_path):
    parts = [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], [user(parts), bot()]])
    with pytest.raises(DataError) as e:
        load_conversations(path, on_bad_example="skip")  # not a policy case: always an error
    expected = "message 0 content part 1 is of type 'image_url'; only {'type': 'text', 'text': ...} parts are supported"
    assert str(e.value) == f"{path}:2: {expected}"


def test_non_string_content_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [[user(), bot(None)]])
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value) == f"{path}:1: message 1 content must be a string or a list of text parts, got NoneType"


BAD = {
    "unknown_role": (
        [user(), {"role": "tool", "content": "42"}],
        "message 1 has role 'tool'; expected one of system, user, assistant",
    ),
    "empty_reply": ([user(), bot(" \n")], "message 1 is an empty assistant reply"),
    "not_alternating": (
        [user(), user("again"), bot()],
        "message 1 is 'user' where 'assistant' was expected; turns must alternate user, assistant, user, ... after an "
        "optional first system message",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_example_is_an_error_with_its_location(tmp_path, kind):
    conv, message = BAD[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [*GOOD[:2], conv])
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value) == f"{path}:3: {message}{HINT}"


@pytest.mark.parametrize("kind", BAD)
def test_bad_example_is_skipped_and_counted(tmp_path, tiny_path, kind, caplog):
    with caplog.at_level("INFO"):
        dm = setup_dm(tmp_path, [*GOOD, BAD[kind][0], BAD[kind][0]], tokenizer=tiny_path, on_bad_example="skip")
    s = dm.stats["train"]
    assert s[f"skipped_{kind}"] == 2 and s["skipped"] == 2
    assert s["examples"] == 8 and s["conversations"] == 6
    # The log names where the first one is, so it can be found and fixed.
    assert f"train: skipped 2 example(s) ({kind}); the first: {tmp_path / 'd.jsonl'}:7: {BAD[kind][1]}" in caplog.text


@pytest.mark.parametrize(
    "conv, message",
    [
        ([bot(), user()], "message 0 is 'assistant' where 'user' was expected"),
        ([user(), bot(), {"role": "system", "content": "late"}], "message 2 is 'system' where 'user' was expected"),
    ],
)
def test_other_orders_that_do_not_alternate(tmp_path, conv, message):
    path = write_jsonl(tmp_path / "d.jsonl", [conv])
    with pytest.raises(DataError, match=f"^{path}:1: {message}; turns must alternate"):
        load_conversations(path)


def test_sharegpt_unknown_speaker(tmp_path):
    turns = [{"from": "human", "value": "2+2?"}, {"from": "function_call", "value": "add(2, 2)"}]
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": turns}]))
    with pytest.raises(DataError) as e:
        load_conversations(str(tmp_path / "d.json"))
    known = "system, human, user, gpt, assistant, model"
    assert (
        str(e.value)
        == f"{tmp_path / 'd.json'}:1 (row 0): turn 1 has from 'function_call'; expected one of {known}{HINT}"
    )


def test_everything_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [BAD["empty_reply"][0]])
    with pytest.raises(DataError) as e:
        load_conversations(path, on_bad_example="skip")
    assert str(e.value) == f"{path}: no usable examples; all 1 were skipped ({{'empty_reply': 1}})"


def test_a_prompt_without_reply_is_skipped_and_counted(tmp_path, tiny_path):
    dm = setup_dm(tmp_path, [*GOOD, [user("no reply")]], tokenizer=tiny_path)
    assert dm.stats["train"]["skipped_no_reply"] == 1 and dm.stats["train"]["skipped"] == 1


# ---------------------------------------------------------------------------- item 4: length
LONG = " ".join(["word"] * 60)


def test_truncate_cuts_at_a_turn_boundary(tiny_tokenizer):
    conv = [user("Hi"), bot("Hello."), user(LONG), bot("ok")]
    full = tokenize_example(conv, tiny_tokenizer, max_length=10_000)
    first = tokenize_example(conv[:2], tiny_tokenizer, max_length=10_000)
    out = tokenize_example(conv, tiny_tokenizer, max_length=full.full_length - 1)
    assert out.outcome == "truncated" and out.full_length == full.full_length
    assert out.example == first.example  # exactly the shorter conversation, ending as the template ends it
    assert tiny_tokenizer.decode(out.example["input_ids"]).endswith("Hello.<|end|>\n<|endoftext|>")


def test_truncate_keeps_the_start_of_a_first_reply_that_does_not_fit(tiny_tokenizer):
    conv = [user("Hi"), bot(LONG)]
    out = tokenize_example(conv, tiny_tokenizer, max_length=20)
    assert out.outcome == "truncated" and len(out.example["input_ids"]) == 20
    full = tokenize_example(conv, tiny_tokenizer, max_length=10_000).example
    assert out.example == {k: v[:20] for k, v in full.items()}
    assert out.example["labels"][-1] != IGNORE_INDEX  # ends inside the reply, on a trained token


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_truncate_never_leaves_a_dangling_header(tiny_tokenizer, train_on):
    conv = [user(LONG), bot("ok")]
    full = tokenize_example(conv, tiny_tokenizer, max_length=10_000).example
    header = full["input_ids"].index(tiny_tokenizer.convert_tokens_to_ids("<|assistant|>"))
    reply = next(i for i, x in enumerate(full["labels"]) if x != IGNORE_INDEX)  # first token of "ok"
    assert reply > header + 1  # the newline after the header lies between them
    for cut in range(header - 2, reply + 2):
        out = tokenize_example(conv, tiny_tokenizer, max_length=cut, train_on=train_on)
        if cut <= reply:  # would end on the user turn, the header or its newline: skipped, never kept
            assert out == (None, "too_long", len(full["input_ids"]))
        else:
            assert out.outcome == "truncated" and out.example["input_ids"] == full["input_ids"][:cut]


def test_datamodule_counts_truncated_too_long_and_dropped(tmp_path, tiny_path, caplog):
    convs = [
        *GOOD,
        [user("Hi"), bot("Hello."), user(LONG), bot("ok")],  # truncated at the turn boundary
        [user("Hi"), bot(LONG)],  # truncated inside the first reply
        [user(LONG), bot("ok")],  # nothing of the reply fits: skipped
    ]
    with caplog.at_level("INFO"):
        dm = setup_dm(tmp_path, convs, tokenizer=tiny_path, max_length=40)
    s = dm.stats["train"]
    assert (s["truncated"], s["skipped_too_long"], s["skipped"], s["dropped"], s["conversations"]) == (2, 1, 1, 0, 8)
    assert all(sum(len(c["input_ids"]) for c in row) <= 40 for row in dm.rows["train"])
    assert "train: 9 examples -> 8 conversations (2 truncated); skipped 1 (too_long 1), dropped 0 (over 40 tokens)" in (
        caplog.text
    )

    dm = setup_dm(tmp_path, convs, tokenizer=tiny_path, max_length=40, truncation="drop")
    s = dm.stats["train"]
    assert (s["truncated"], s["skipped_too_long"], s["skipped"], s["dropped"], s["conversations"]) == (0, 0, 0, 3, 6)
    assert s["examples"] == s["conversations"] + s["skipped"] + s["dropped"]


def test_sharegpt_policy_messages_name_the_turn_in_the_file(tmp_path):
    # The top-level system becomes message 0, but the message still names the turn as written in the file.
    turns = [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi"}]
    (tmp_path / "d.json").write_text(json.dumps([{"system": "Be brief.", "conversations": turns}]))
    with pytest.raises(DataError) as e:
        load_conversations(str(tmp_path / "d.json"))
    assert str(e.value).startswith(f"{tmp_path / 'd.json'}:1 (row 0): turn 0 is 'assistant' where 'user' was expected")


def test_cli_stops_on_a_bad_example_with_its_location(tmp_path, capsys):
    from helpers import ROOT

    from phi3lit.__main__ import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [*GOOD, BAD["empty_reply"][0]])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.train_file", bad,
              "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert e.value.code == 2
    assert f"phi3lit: data error: {bad}:7: message 1 is an empty assistant reply{HINT}" in capsys.readouterr().err
