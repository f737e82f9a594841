"""The offline default: shipped assets are what the generator makes; the tiny model is a real Phi-3, and the lab's
base is pretrained deterministically and knows its world."""

import json

from helpers import run_main

from phi3lit.tiny import DEMO_TASK_DATA, TINY_DATA, TINY_TOKENIZER, WORLD_DIR, write_assets
from phi3lit.tiny.world import SPLITS, make_world, questions


def test_shipped_assets_match_the_generator(tmp_path):
    write_assets(tmp_path, demo=tmp_path / "demo.jsonl")
    assert (tmp_path / TINY_DATA.name).read_bytes() == TINY_DATA.read_bytes()
    assert (tmp_path / "demo.jsonl").read_bytes() == DEMO_TASK_DATA.read_bytes()
    for f in [*TINY_TOKENIZER.iterdir(), *WORLD_DIR.iterdir()]:
        assert (tmp_path / f.parent.name / f.name).read_bytes() == f.read_bytes(), f.name


def test_the_world_keeps_the_held_out_people_out_of_the_fine_tuning_data(tiny_tokenizer):
    world = make_world()
    assert [sum(p.split == s for p in world) for s in SPLITS] == list(SPLITS.values())
    held_out = {p.name for p in world if p.split != "train"}
    train_text = (WORLD_DIR / "train.jsonl").read_text()
    assert not [n for n in held_out if n in train_text]
    demo = [json.loads(line) for line in DEMO_TASK_DATA.read_text().splitlines()]
    assert {r["question"] for r in demo} == {q for p in world if p.split == "test" for q, _ in questions(p)}
    # One token per name: the facts hang on one embedding, which is what a 2-layer toy can learn in minutes.
    assert all(len(tiny_tokenizer.tokenize(" " + p.name)) == 1 for p in world)


def test_the_base_knows_held_out_people_from_documents_only(tiny_path, tiny_tokenizer):
    """builtin:tiny-phi3 answers plain-text questions (the question, then the answer on the next line) about the
    `test` people, whom it only read biographies of: the knowledge LoRA is asked to reach in chat is in the base
    (that the base alone cannot answer in chat is tested in e2e/test_lab)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    rows = [(q, a) for p in make_world() if p.split == "test" for q, a in questions(p)]
    prompts = [f"{q}\n" for q, _ in rows]
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=0)
    got = tiny_tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :])
    right = sum(g.strip() == a for g, (_, a) in zip(got, rows, strict=True))
    assert right / len(rows) >= 0.9, list(zip(got, rows, strict=True))[:10]


def test_the_base_build_is_deterministic_through_the_cli(tmp_path):
    """`tiny --pretrain_steps N` is the code path of builtin:tiny-phi3 (600 steps there, 8 here): twice gives the
    same bytes, and the pretraining changed the weights."""
    for name, steps in (("a", 8), ("b", 8), ("init", 0)):
        run_main(["tiny", "--out", str(tmp_path / name), "--pretrain_steps", str(steps)])
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b", "init")}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["init"]


def test_tiny_model_is_phi3_loaded_through_from_pretrained(tiny_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert type(model).__name__ == "Phi3ForCausalLM"
    layer = model.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and hasattr(layer.mlp, "gate_up_proj")  # Phi-3's fused layout
    assert model.config.vocab_size >= len(tiny_tokenizer) and model.config.vocab_size % 64 == 0
    assert tiny_tokenizer.unk_token_id == 0 == tiny_tokenizer.pad_token_id  # pad is <unk>, never eos
    for t in ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        assert tiny_tokenizer.convert_tokens_to_ids(t) != tiny_tokenizer.unk_token_id
