"""Dataset layouts (messages, ShareGPT, Alpaca / prompt-completion) and sources (JSON, JSONL, parquet, hub config)."""

import json

import pytest
from helpers import SHARED_DATA, needs_real_tokenizer, needs_shared_data

from phi3lit.data import ChatDataModule, DataError, detect_format, load_conversations, read_conversations

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return str(path)


@pytest.mark.parametrize(
    "row, layout",
    [
        ({"messages": CONV}, "messages"),
        ({"conversations": [], "id": 3}, "sharegpt"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "alpaca"),
        ({"messages": CONV, "prompt": "a"}, "messages"),  # UltraChat has both; messages wins
    ],
)
def test_detect_format(row, layout):
    assert detect_format(row, "f:1") == layout


def test_detect_format_names_the_fields_it_saw():
    with pytest.raises(DataError) as e:
        detect_format({"text": "x", "label": 1}, "d.jsonl:1")
    assert str(e.value).startswith("d.jsonl:1: cannot tell the data layout (fields: 'text', 'label'); expected")


def test_sharegpt_with_top_level_system_and_role_aliases(tmp_path):
    rows = [
        {"system": "Be brief.",
         "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hi"},
                           {"from": "model", "value": "Hello."}]},
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]},
    ]  # fmt: skip
    assert load_conversations(write(tmp_path / "d.json", rows)) == [CONV, CONV, CONV]


def test_alpaca_and_prompt_completion(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    convs = load_conversations(write(tmp_path / "a.jsonl", rows))
    assert convs[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert convs[1] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    rows = [
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": CONV[:2], "completion": CONV[2:]},  # TRL's conversational prompt-completion
        {"prompt": "Hi"},  # a prompt for `predict`
    ]
    convs = load_conversations(write(tmp_path / "p.jsonl", rows))
    assert convs == [CONV[1:], CONV, CONV[1:2]]


def test_text_parts_are_joined_with_newlines(tmp_path):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    rows = [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": parts[:1]}]}]
    convs = load_conversations(write(tmp_path / "d.jsonl", rows))
    assert convs == [[{"role": "user", "content": "first\nsecond"}, {"role": "assistant", "content": "first"}]]


def test_named_format_must_match_the_file(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"messages": CONV}])
    with pytest.raises(DataError) as e:
        load_conversations(path, format="sharegpt")
    assert str(e.value) == f"{path}:1: example has no 'conversations' field (sharegpt layout)"
    with pytest.raises(DataError) as e:
        load_conversations(path, format="alpaca")
    assert str(e.value) == f"{path}:1: example has no 'instruction' or 'prompt' field (alpaca layout)"


def test_json_list_errors_name_the_line_of_the_element(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(f'[\n  {json.dumps({"messages": CONV})},\n\n  {{"messages": [{{"role": "user"}}]}}\n]\n')
    with pytest.raises(DataError) as e:
        load_conversations(str(path))
    assert str(e.value) == f"{path}:4 (row 1): message 0 needs both 'role' and 'content'"


def test_parquet_alpaca(tmp_path):
    import datasets

    rows = {"instruction": ["Say hi", "Add"], "input": [None, "1 + 1"], "output": ["hi", "2"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "a.parquet"))
    convs = load_conversations(str(tmp_path / "a.parquet"))
    assert [c[0]["content"] for c in convs] == ["Say hi", "Add\n\n1 + 1"]


def test_hub_style_dataset_with_a_config(tmp_path):
    # A local folder is read like a hub dataset: `load_dataset(name, config, split=split)`.
    card = "---\nconfigs:\n- config_name: en\n  data_files: en.jsonl\n- config_name: fr\n  data_files: fr.jsonl\n---\n"
    (tmp_path / "README.md").write_text(card)
    write(tmp_path / "en.jsonl", [{"messages": CONV}])
    fr = [{"role": "user", "content": "Salut"}, {"role": "assistant", "content": "Bonjour."}]
    write(tmp_path / "fr.jsonl", [{"messages": fr}])
    assert load_conversations(str(tmp_path), "train", config="fr") == [fr]
    assert load_conversations(str(tmp_path), "train", config="en") == [CONV]


def test_bad_format_argument_is_refused_early():
    with pytest.raises(ValueError, match="format must be one of auto, messages, sharegpt, alpaca, got 'csv'"):
        read_conversations("x.jsonl", format="csv")
    with pytest.raises(ValueError, match="data.truncation must be one of truncate, drop, got 'cut'"):
        ChatDataModule("x.jsonl", truncation="cut")


@needs_shared_data
def test_shared_sharegpt_and_messages_files_hold_the_same_conversations():
    a = load_conversations(str(SHARED_DATA / "dpo_en_demo_chosen.jsonl"))
    b = load_conversations(str(SHARED_DATA / "dpo_en_demo_chosen.sharegpt.json"))
    assert len(a) == 300 and a == b


@needs_real_tokenizer
@needs_shared_data
def test_shared_sharegpt_and_messages_files_give_identical_ids_and_labels(tmp_path, real_tokenizer):
    tokenized = {}
    for name in ("dpo_en_demo_chosen.jsonl", "dpo_en_demo_chosen.sharegpt.json"):
        dm = ChatDataModule(
            str(SHARED_DATA / name),
            val_fraction=0.0,
            tokenizer=str(real_tokenizer.name_or_path),
            max_length=2048,
            cache_dir=str(tmp_path / name),  # separate caches: both really tokenize
        )
        dm.setup("fit")
        assert dm.stats["train"]["tokenized"] == 300
        ds = dm.tokenized["train"]
        packing = [[len(c["input_ids"]) for c in row] for row in dm.rows["train"]]
        tokenized[name] = (list(ds["input_ids"]), list(ds["labels"]), packing)
    a, b = tokenized.values()
    assert a == b


def test_a_new_layout_is_one_function_and_one_registry_entry(tmp_path, monkeypatch):
    """The registry is the only place a layout is named: `format: auto` detects it and `data.format` accepts it."""
    from phi3lit.data.formats import LAYOUTS, Layout

    def qa_layout(row, where):  # {"q": ..., "a": ...}
        return [
            {"role": "user", "content": row["q"], "at": "'q'"},
            {"role": "assistant", "content": row["a"], "at": "'a'"},
        ]

    monkeypatch.setitem(LAYOUTS, "qa", Layout(qa_layout, lambda row: "q" in row, "'q'"))
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "2+2?", "a": "4"}\n')
    expected = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    assert load_conversations(str(path)) == expected  # auto
    assert load_conversations(str(path), format="qa") == expected
    assert ChatDataModule(str(path), format="qa").hparams.format == "qa"
    with pytest.raises(DataError, match=r"example has no 'q' field \(qa layout\)"):
        path.write_text('{"messages": []}\n')
        load_conversations(str(path), format="qa")
