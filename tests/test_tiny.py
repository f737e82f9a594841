"""The offline default: shipped assets are what the generator makes; the tiny model is a real Phi-3."""

from phi3lit.tiny import TINY_DATA, TINY_TOKENIZER, write_assets


def test_shipped_assets_match_the_generator(tmp_path):
    write_assets(tmp_path)
    assert (tmp_path / TINY_DATA.name).read_bytes() == TINY_DATA.read_bytes()
    for f in TINY_TOKENIZER.iterdir():
        assert (tmp_path / TINY_TOKENIZER.name / f.name).read_bytes() == f.read_bytes(), f.name


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
