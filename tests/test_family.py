"""The Phi-3 family (phi3lit.family): offline plans of the real shapes, and each structural feature on a tiny model.

Tiny models of every shape (phi3lit.tiny.TINY_SHAPES) keep what differs between the members: grouped-query
attention (Phi-3-medium, Phi-4-mini), LongRoPE with a 64-position original context a test can cross (the 128k
models, Phi-3.5-mini, Phi-4-mini), partial rotary and tied embeddings (Phi-4-mini).
"""

import json
import shutil
import warnings

import pytest
import torch
from helpers import REAL_TOKENIZER, ROOT, needs_real_tokenizer

from phi3lit.data.chat import render_system_message, system_role_supported
from phi3lit.errors import ConfigError
from phi3lit.family import (
    FAMILY,
    MEDIUM_TEMPLATE,
    MINI_TEMPLATE,
    PHI4_MINI_TEMPLATE,
    PHI35_TEMPLATE,
    check_phi3,
    member,
    phi3_config,
)
from phi3lit.hub import resolve_pretrained
from phi3lit.model.lora import LoraSpec, apply_lora, effective_trainable, slice_rows, tied_embeddings, untie_for_merge
from phi3lit.model.rope import DocumentLongRoPE, document_lengths, install_document_rope
from phi3lit.tiny import TINY_NAME, TINY_SHAPES

SHAPES = [s for s in TINY_SHAPES if s != "mini-4k"]


def builtin(shape: str) -> str:
    return TINY_NAME if shape == "mini-4k" else f"{TINY_NAME}-{shape}"


def tiny(shape: str, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_pretrained(builtin(shape)), **kw).eval()


# ---------------------------------------------------------------------------- the registry and plan
# hub id: (all parameters, trainable at the shipped configs' r=16 on qkv/o/gate_up/down, trainable with [q, v]).
PINNED = {
    "microsoft/Phi-3-mini-4k-instruct": (3_821_079_552, 25_165_824, 6_291_456),
    "microsoft/Phi-3-mini-128k-instruct": (3_821_079_552, 25_165_824, 6_291_456),
    "microsoft/Phi-3.5-mini-instruct": (3_821_079_552, 25_165_824, 6_291_456),
    "microsoft/Phi-3-medium-4k-instruct": (13_960_238_080, 55_705_600, 10_649_600),
    "microsoft/Phi-3-medium-128k-instruct": (13_960_238_080, 55_705_600, 10_649_600),
    "microsoft/Phi-4-mini-instruct": (3_836_021_760, 23_068_672, 5_242_880),
}


def test_every_member_is_cited_and_has_a_shipped_config():
    assert set(PINNED) == set(FAMILY)
    for hub_id, m in FAMILY.items():
        assert m.url == f"https://huggingface.co/{hub_id}/blob/main/config.json"
        assert m.source and m.template_source
        assert (ROOT / m.recipe).is_file(), m.recipe
        assert m.tiny_shape in TINY_SHAPES
        text = (ROOT / m.recipe).read_text()
        header = text[: text.index("trainer:")]
        launch = f"python -m phi3lit fit --config configs/recipe.yaml --config {m.recipe}\n"
        assert launch in header  # the launch command, in the opening comment
        assert f"pretrained: {hub_id}\n" in text
    assert member("MICROSOFT/phi-3-medium-4k-instruct") is FAMILY["microsoft/Phi-3-medium-4k-instruct"]
    assert member("Phi-3-medium-4k-instruct") is None  # a bare name may be a local folder


@pytest.mark.parametrize("hub_id", list(PINNED), ids=[h.split("/")[1] for h in PINNED])
def test_real_shapes_are_counted_exactly_offline(hub_id):
    from transformers import Phi3ForCausalLM

    from phi3lit.tools.plan import load_config

    total, trainable, qv = PINNED[hub_id]
    config = load_config(hub_id)  # offline: no hub access in tests
    assert config.model_type == "phi3"
    head_dim = config.hidden_size // config.num_attention_heads
    assert head_dim == 128 if "medium" in hub_id or "Phi-4" in hub_id else head_dim == 96
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == total
    for targets, expected in ((["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], trainable), (["q", "v"], qv)):
        with torch.device("meta"):
            adapted = apply_lora(Phi3ForCausalLM(config), LoraSpec(r=16, targets=targets))
        assert effective_trainable(adapted) == expected


def test_real_structural_features():
    names = ("Phi-3.5-mini-instruct", "Phi-3-medium-128k-instruct", "Phi-4-mini-instruct")
    mini, medium, phi4 = (phi3_config(f"microsoft/{n}") for n in names)
    assert (medium.num_attention_heads, medium.num_key_value_heads) == (40, 10)
    assert (phi4.num_attention_heads, phi4.num_key_value_heads) == (24, 8)
    assert phi4.tie_word_embeddings and phi4.rope_parameters["partial_rotary_factor"] == 0.75
    for c, n in ((mini, 48), (medium, 64), (phi4, 48)):  # head_dim * partial_rotary_factor / 2 factors
        assert c.rope_parameters["rope_type"] == "longrope"
        assert len(c.rope_parameters["long_factor"]) == len(c.rope_parameters["short_factor"]) == n
        assert c.rope_parameters["original_max_position_embeddings"] == 4096 and c.max_position_embeddings == 131072
    # GQA: qkv_proj's slices have unequal sizes, and the slice masks follow them.
    assert slice_rows(medium, "qkv_proj") == {"q": (0, 5120), "k": (5120, 6400), "v": (6400, 7680)}
    assert slice_rows(phi4, "qkv_proj") == {"q": (0, 3072), "k": (3072, 4096), "v": (4096, 5120)}


def test_plan_refuses_a_model_that_is_not_phi3(tmp_path):
    from transformers import LlamaConfig

    from phi3lit.tools.plan import estimate

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"architectures LlamaForCausalLM and model_type 'llama', not Phi3ForC.*Phi-4-mini"
    ):
        estimate(str(tmp_path), LoraSpec(), "float32", "32-true", 1, 64, False)
    with pytest.raises(ConfigError, match="model_type 'phi3small'"):
        check_phi3(type("C", (), {"model_type": "phi3small", "architectures": ["Phi3SmallForCausalLM"]})(), "x")
    check_phi3(phi3_config("microsoft/Phi-4-mini-instruct"), "microsoft/Phi-4-mini-instruct")  # accepted


def test_plan_counts_a_4bit_base_as_4bit(monkeypatch):
    from phi3lit.tools import plan
    from phi3lit.tools.plan import estimate

    monkeypatch.setattr(plan, "activation_bytes_per_token_layer", lambda *a: 0.0)  # measured elsewhere; slow here

    kw = dict(lora=LoraSpec(), torch_dtype="bfloat16", precision="bf16-mixed", micro_batch=1, max_length=64,
              gradient_checkpointing=True)  # fmt: skip
    bf16 = estimate("microsoft/Phi-3-mini-4k-instruct", **kw)["memory"]["frozen weights"]
    nf4 = estimate("microsoft/Phi-3-mini-4k-instruct", **kw, quantization="nf4")["memory"]["frozen weights"]
    assert 0.25 < nf4 / bf16 < 0.45  # decoder weights at ~0.52 bytes, embeddings and lm_head in fp32


# ---------------------------------------------------------------------------- tiny shapes
@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_tiny_shapes_keep_the_structure(shape):
    model = tiny(shape)
    c = model.config
    assert type(model).__name__ == "Phi3ForCausalLM" and c.architectures == ["Phi3ForCausalLM"]
    real = [m for m in FAMILY.values() if m.tiny_shape == shape]
    assert real, shape
    ref = phi3_config(real[0].hub_id)
    ratio = ref.num_attention_heads // ref.num_key_value_heads
    assert c.num_attention_heads // c.num_key_value_heads == ratio
    assert c.tie_word_embeddings == ref.tie_word_embeddings == tied_embeddings(model)
    assert c.rope_parameters["rope_type"] == ref.rope_parameters["rope_type"]
    assert c.rope_parameters.get("partial_rotary_factor", 1.0) == ref.rope_parameters.get("partial_rotary_factor", 1.0)
    if ref.rope_parameters["rope_type"] == "longrope":
        assert c.rope_parameters["original_max_position_embeddings"] == 64 < c.max_position_embeddings


def test_builtin_tiny_phi3_is_unchanged_and_unknown_shapes_are_named():
    assert resolve_pretrained(TINY_NAME).rsplit("/", 1)[1].startswith("tiny-phi3-") and "medium" not in TINY_NAME
    with pytest.raises(ValueError, match="tiny-phi3-phi4-mini"):
        resolve_pretrained("builtin:tiny-phi3-huge")


def packed(lengths_per_row, vocab, seed=0):
    from phi3lit.data import collate

    g = torch.Generator().manual_seed(seed)
    rows = [[{"input_ids": (ids := torch.randint(3, vocab, (n,), generator=g).tolist()), "labels": ids} for n in row]
            for row in lengths_per_row]  # fmt: skip
    return collate(rows, pad_id=0)


def hidden(model, batch, impl):
    model.set_attn_implementation(impl)
    extra = {"doc_offsets": batch["cu_seq_lens"]} if impl == "sdpa_docs" else {}
    with torch.no_grad():
        return model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           **extra).last_hidden_state  # fmt: skip


@pytest.mark.parametrize("shape", ["medium-4k", "medium-128k", "phi4-mini"])
def test_sdpa_docs_equals_the_dense_mask_under_gqa(shape):
    from phi3lit.model import attention  # noqa: F401

    model = tiny(shape)
    batch = packed([[5, 20, 15], [12, 9]], model.config.vocab_size)
    torch.testing.assert_close(hidden(model, batch, "sdpa_docs"), hidden(model, batch, "sdpa"), atol=1e-5, rtol=0)


def test_gqa_slice_targets_follow_the_unequal_slices():
    """[k] on a 8:2 GQA model: rank-r A, B rows only in k's 64 rows of qkv_proj's 384; q and v stay the base's."""
    model = apply_lora(tiny("medium-4k"), LoraSpec(r=4, targets=["k"], dropout=0.0))
    c = model.config
    rows = slice_rows(c, "qkv_proj")
    assert rows == {"q": (0, 256), "k": (256, 320), "v": (320, 384)}
    assert effective_trainable(model) == c.num_hidden_layers * 4 * (c.hidden_size + 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=torch.randint(3, 200, (2, 16)), labels=torch.randint(3, 200, (2, 16))).loss.backward()
        opt.step()
        opt.zero_grad()
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    delta = layer.get_delta_weight("default")
    assert delta[256:320].abs().max() > 0
    assert delta[:256].abs().max() == 0 and delta[320:].abs().max() == 0


# ---------------------------------------------------------------------------- LongRoPE per conversation
def test_document_lengths():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 0, 1, 2, 3, 0, 0, 1]])
    assert document_lengths(pos).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4], [7, 7, 4, 4, 4, 4, 1, 2, 2]]
    assert document_lengths(torch.tensor([[99]])).tolist() == [[100]]  # a decoding step with a KV cache


def logits_alone(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def logits_packed(model, batch, impl="sdpa_docs"):
    model.set_attn_implementation(impl)
    extra = {"doc_offsets": batch["cu_seq_lens"]} if impl == "sdpa_docs" else {}
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra).logits


def split(batch, logits):
    """Each conversation's logits out of the packed rows, in order (padding runs skipped)."""
    out, flat_ids, flat = [], batch["input_ids"].flatten(), logits.flatten(0, 1)
    bounds = batch["cu_seq_lens"].tolist()
    for a, b in zip(bounds, bounds[1:], strict=False):
        if flat_ids[a:b].ne(0).any():
            out.append((flat_ids[a:b].tolist(), flat[a:b]))
    return out


@pytest.mark.parametrize("shape", ["mini-128k", "phi4-mini"])
@pytest.mark.parametrize("impl", ["sdpa_docs", "sdpa"])
def test_packed_row_gives_each_conversation_its_logits_alone(shape, impl):
    """The original context of the tiny LongRoPE models is 64 positions. Conversations of 20-40 tokens packed into
    rows (padding runs included) give the logits each has alone, with and without DocumentLongRoPE; with one
    conversation of 100 tokens in the batch, stock transformers moves every conversation of the batch to the long
    factors (not what each sees alone), and DocumentLongRoPE keeps each on its own."""
    stock = tiny(shape)
    fixed = tiny(shape)
    assert install_document_rope(fixed) and isinstance(fixed.model.rotary_emb, DocumentLongRoPE)
    assert not install_document_rope(fixed)  # once
    vocab = stock.config.vocab_size

    short = packed([[20, 30, 12], [40]], vocab)
    for model in (stock, fixed):
        for ids, got in split(short, logits_packed(model, short, impl)):
            torch.testing.assert_close(got, logits_alone(stock, ids), atol=2e-5, rtol=0)

    mixed = packed([[100, 20], [30]], vocab, seed=1)
    pieces = split(mixed, logits_packed(fixed, mixed, impl))
    assert [len(ids) for ids, _ in pieces] == [100, 20, 30]
    for ids, got in pieces:
        torch.testing.assert_close(got, logits_alone(stock, ids), atol=2e-5, rtol=0)
    wrong = split(mixed, logits_packed(stock, mixed, impl))
    assert not torch.allclose(wrong[1][1], logits_alone(stock, wrong[1][0]), atol=1e-3)  # the documented pitfall
    torch.testing.assert_close(wrong[0][1], pieces[0][1], atol=2e-5, rtol=0)  # the long one was right anyway


def test_document_rope_is_transformers_rope_for_one_sequence():
    stock, fixed = tiny("phi4-mini"), tiny("phi4-mini")
    install_document_rope(fixed)
    for n in (10, 64, 65, 200):
        ids = torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert torch.equal(fixed(input_ids=ids).logits, stock(input_ids=ids).logits), n
    assert not install_document_rope(tiny("medium-4k"))  # no LongRoPE: nothing to do


# ---------------------------------------------------------------------------- tied embeddings (Phi-4-mini)
IDS = torch.tensor([[7, 20, 30, 40, 50, 60, 6, 3, 100, 200]])


def trained_adapter(spec: LoraSpec, out):
    model = apply_lora(tiny("phi4-mini"), spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # as if trained: B is no longer zero
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about tied layers
        model.save_pretrained(out)
    return expected


@pytest.mark.parametrize(
    "spec",
    [LoraSpec(targets=["lm_head"]), LoraSpec(targets=["embed"]), LoraSpec(targets=["embed", "lm_head", "o"]),
     LoraSpec(targets=["o"], modules_to_save=["lm_head"]), LoraSpec(targets=["all-linear"])],
    ids=["lm_head", "embed", "both", "modules_to_save", "all-linear"],
)  # fmt: skip
def test_tied_embeddings_adapter_and_merge_are_exact(spec, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    expected = trained_adapter(spec, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny("phi4-mini"), tmp_path / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
        adapted = {"embed", "lm_head"} & set(spec.targets)
        assert untie_for_merge(loaded) == bool(adapted)
        merged = loaded.merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.tie_word_embeddings == (not adapted and not spec.modules_to_save)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)


def test_merging_into_a_tied_matrix_without_untying_is_wrong(tmp_path):
    """Why export must call untie_for_merge: peft folds lm_head's B A into the shared matrix, so into embed too."""
    from peft import PeftModel

    expected = trained_adapter(LoraSpec(targets=["lm_head"]), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(tiny("phi4-mini"), tmp_path).merge_and_unload()
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=IDS).logits, expected, atol=1e-2)


# ---------------------------------------------------------------------------- chat templates
TEMPLATES = {"mini-4k": MINI_TEMPLATE, "phi3.5-mini": PHI35_TEMPLATE, "medium": MEDIUM_TEMPLATE,
             "phi4-mini": PHI4_MINI_TEMPLATE}  # fmt: skip
CHAT = [
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Bonjour !"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "Quatre.\nC'est tout."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The real Phi-3 tokenizer with each family template installed (the 200k Phi-4 vocabulary is not here; its
    template uses the same role tokens, which is what the masks depend on)."""
    if not REAL_TOKENIZER.is_dir():
        pytest.skip("../shared/phi3-tokenizer is absent")
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        folder = tmp_path_factory.mktemp(name)
        for f in REAL_TOKENIZER.iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        out[name] = AutoTokenizer.from_pretrained(folder)
        assert out[name].chat_template == template
    return out


@needs_real_tokenizer
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_assistant_only_masks_are_exact_for_each_template(tokenizers, name):
    from phi3lit.data import tokenize_chat

    tok = tokenizers[name]
    messages = render_system_message(CHAT, tok) if name == "medium" else CHAT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tokenize_chat(messages, tok)
    ids, labels = out["input_ids"], out["labels"]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids).replace(" ", "") == text.replace(" ", "")  # the template's text, token for token
    trained = [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels, strict=True) if lab != -100]
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    # Exactly each reply's tokens and its closing <|end|>: no header, no newline after <|end|>, no user text.
    spans, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert [tok.decode(s) for s in spans] == [r + "<|end|>" for r in replies]
    assert trained.count("<|end|>") == 2 and "<|assistant|>" not in trained


@needs_real_tokenizer
def test_medium_template_drops_a_system_message_and_phi3lit_keeps_it(tokenizers):
    medium = tokenizers["medium"]
    assert not system_role_supported(medium)
    assert all(system_role_supported(tokenizers[n]) for n in ("mini-4k", "phi3.5-mini", "phi4-mini"))
    assert "French" not in medium.apply_chat_template(CHAT, tokenize=False)  # the template's own behaviour
    with pytest.warns(UserWarning, match="no system role"):
        folded = render_system_message(CHAT, medium)
    assert folded[0] == {"role": "user", "content": "Answer in French.\n\nHello there"} and folded[1:] == CHAT[2:]
    assert "Answer in French.\n\nHello there" in medium.apply_chat_template(folded, tokenize=False)
    with pytest.raises(ConfigError, match="no system role"):
        render_system_message(CHAT, medium, policy="error")
    assert render_system_message(CHAT, tokenizers["mini-4k"]) == CHAT  # a template with a system role: unchanged


# ---------------------------------------------------------------------------- end to end, per family member
E2E = {  # tiny shape: extra fit arguments
    "mini-4k": [],
    "mini-128k": [],
    "medium-4k": ["--model.lora.targets", "[q, v, o, down]"],  # GQA slices: unequal q / v blocks
    "medium-128k": [],
    "phi4-mini": ["--model.lora.targets", "[all-linear, lm_head]"],  # LoRA on the tied matrix
}


@pytest.mark.parametrize("shape", list(E2E))
def test_family_member_fits_exports_and_reloads(shape, small_data, tmp_path):
    """`fit` a few steps through the CLI on the tiny model of each shape, export the adapter (and a merged model),
    reload both with stock peft / transformers and compare logits with the model as trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phi3lit.__main__ import main
    from phi3lit.model.module import Phi3LoRA

    run = tmp_path / "run"
    main([
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.pretrained", builtin(shape),
        "--data.train_file", str(small_data), "--trainer.default_root_dir", str(run), "--trainer.max_steps", "3",
        "--data.max_length", "128", "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]",
        "--trainer.val_check_interval", "3", *E2E[shape],
    ])  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    module = Phi3LoRA.load_from_checkpoint(ckpt).eval()
    ids = torch.tensor([[7, 20, 30, 40, 50, 60, 6, 3, 100, 200] * 8])  # 80 tokens: past the 64 original positions
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
    base = resolve_pretrained(builtin(shape))
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "adapter")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits, expected, atol=1e-4)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--merge", "true"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@needs_real_tokenizer
def test_the_mini_template_is_the_real_tokenizers():
    config = json.loads((REAL_TOKENIZER / "tokenizer_config.json").read_text())
    assert config["chat_template"] == MINI_TEMPLATE
