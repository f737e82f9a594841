"""The offline default: a tiny Phi-3 pretrained on a synthetic world, its tokenizer, and synthetic chats.

Nothing here downloads. `builtin:tiny-phi3` names a model folder that phi3lit builds on first use: a real
`Phi3ForCausalLM` (fused `qkv_proj` / `gate_up_proj`, RoPE, RMSNorm, sliding-window mask path) at toy size,
pretrained (every weight, a few minutes on two CPU cores) on the lab's world (`phi3lit.tiny.world`: invented people
and their facts as plain documents, plus skill chats), saved with `save_pretrained` and loaded back through the same
`AutoModelForCausalLM.from_pretrained` call that loads `microsoft/Phi-3-mini-4k-instruct`. The other shapes
(`builtin:tiny-phi3-<shape>`) stay seeded random-init: they exist to exercise each family member's structure.

The tokenizer is a byte-level BPE (shipped in `assets/tiny-tokenizer/`) with Phi-3's special tokens and Phi-3's
chat template, so every code path that looks for `<|assistant|>` or `<|end|>` is exercised; it is trained on the
skill chats and the world's text, so each invented name is one token. The skill chats (`assets/tiny_chat.jsonl`,
from `make_chat_data`), the world's chats (`assets/world/`) and the demo eval task's rows are generated here;
`python -m phi3lit.tiny` rewrites them all, and a test checks that the shipped files are exactly what the code
generates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Phi-3's chat template, verbatim from microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json (kept in family.py).
from phi3lit.family import MINI_TEMPLATE as PHI3_CHAT_TEMPLATE
from phi3lit.files import atomic_folder
from phi3lit.tiny.world import biography, eval_rows, make_world, make_world_chats, questions

ASSETS = Path(__file__).parent.parent / "assets"
TINY_DATA = ASSETS / "tiny_chat.jsonl"
TINY_TOKENIZER = ASSETS / "tiny-tokenizer"
WORLD_DIR = ASSETS / "world"  # train.jsonl / val.jsonl: the lab's chats (people of those splits only)
DEMO_TASK_DATA = Path(__file__).parent.parent / "tools" / "eval_tasks" / "phi3lit_demo.jsonl"  # the test people
WORLD_CHATS = {"train": 2000, "val": 200}  # conversations per shipped split
TINY_NAME = "builtin:tiny-phi3"

# <unk> first so that the pad id is 0, as in Phi-3 (padding with eos teaches a model never to stop).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

# Toy shape of the real architecture: small enough for a 2-core CPU, big enough to learn the synthetic tasks.
TINY_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    sliding_window=1023,  # like Phi-3-mini (2047 of 4096): keeps the sliding-window mask path under test
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def _factors(n: int, top: float) -> list[float]:
    return [round(1.0 + (top - 1.0) * i / max(1, n - 1), 4) for i in range(n)]


# Tiny models of each Phi-3-family shape (phi3lit.family): toy sizes, but the structural features of the real
# model kept: grouped-query attention (the query:KV head ratio), LongRoPE with short/long factor lists of
# head_dim * partial_rotary_factor / 2 entries and an original context of 64 positions (so a tiny test crosses
# it), partial rotary and tied embeddings. `mini-4k` is TINY_CONFIG itself (builtin:tiny-phi3).
_LONG = dict(max_position_embeddings=1024, original_max_position_embeddings=64, sliding_window=2048)
TINY_SHAPES: dict[str, dict] = {
    "mini-4k": TINY_CONFIG,
    # Phi-3-mini-128k and Phi-3.5-mini: 32 heads of 96 -> 4 heads of 64, LongRoPE.
    "mini-128k": dict(TINY_CONFIG, **_LONG, rope_scaling={
        "type": "longrope", "short_factor": _factors(32, 2.0), "long_factor": _factors(32, 64.0)}),
    # Phi-3-medium-4k: GQA 40:10 -> 8:2, intermediate 3.5 x hidden.
    "medium-4k": dict(TINY_CONFIG, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2),
    "medium-128k": dict(TINY_CONFIG, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2, **_LONG,
                        rope_scaling={"type": "longrope", "short_factor": _factors(16, 16.0),
                                      "long_factor": _factors(16, 65.0)}),
    # Phi-4-mini: GQA 24:8 -> 6:2 of head_dim 64, 0.75 of each head rotated (48 dims, 24 factors), tied embeddings.
    "phi4-mini": dict(TINY_CONFIG, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                      num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True, **_LONG,
                      rope_scaling={"type": "longrope", "short_factor": _factors(24, 1.5),
                                    "long_factor": _factors(24, 40.0)}),
}  # fmt: skip

# ---------------------------------------------------------------------------- synthetic chat data
_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise tutor. Answer in one line.",
    "Answer briefly and exactly.",
    "You are a careful assistant who double-checks arithmetic.",
]
_CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Kenya": "Nairobi",
    "Peru": "Lima", "Canada": "Ottawa", "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago",
}  # fmt: skip
_WORDS = "red blue green cat dog sun moon tree river stone cloud bird fish lamp door book".split()  # noqa: SIM905


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == 1:
        words = rng.choices(_WORDS, k=rng.randint(2, 8))
        return "Reverse the words: " + " ".join(words), " ".join(reversed(words))
    if kind == 2:
        country = rng.choice(sorted(_CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."
    if kind == 3:
        lo = rng.randrange(20)
        hi = lo + rng.randint(2, 25)  # long counts give the long tail of lengths that packing needs
        return f"Count from {lo} to {hi}.", ", ".join(str(i) for i in range(lo, hi + 1))
    words = rng.choices(_WORDS, k=rng.randint(1, 5))
    return "Shout: " + " ".join(words), " ".join(words).upper() + "!"


def make_chat_data(n: int = 1200, seed: int = 0) -> list[dict]:
    """`n` conversations with optional system prompts and 1-3 user/assistant exchanges."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        for _ in range(rng.choice([1, 1, 2, 3])):
            question, answer = _task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- tokenizer
def train_tiny_tokenizer(rows: list[dict], vocab_size: int = 2048, extra_texts: list[str] = ()):
    """A byte-level BPE trained on the chat data (and `extra_texts`), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [m["content"] for r in rows for m in r["messages"]] + list(extra_texts)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<unk>",
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def world_assets() -> dict[str, list[dict]]:
    """The world's shipped rows: chats per split, and the demo task's questions about the `test` people."""
    people = make_world()
    out = {split: make_world_chats(people, split, n) for split, n in WORLD_CHATS.items()}
    out["demo"] = eval_rows(people, "test")
    return out


def tokenizer_texts() -> list[str]:
    """The world's text the tokenizer learns from besides the skill chats: five biographies of everyone, and every
    question (so names, towns and question words become whole tokens)."""
    rng, people = random.Random(0), make_world()
    return [biography(p, rng) for p in people for _ in range(5)] + [q for p in people for q, _ in questions(p)]


def write_assets(dest: Path = ASSETS, demo: Path = DEMO_TASK_DATA) -> None:
    """Regenerate the shipped data and tokenizer (`python -m phi3lit.tiny`)."""
    rows = make_chat_data()
    write_jsonl(rows, dest / TINY_DATA.name)
    world = world_assets()
    (dest / WORLD_DIR.name).mkdir(exist_ok=True)
    for split in WORLD_CHATS:
        write_jsonl(world[split], dest / WORLD_DIR.name / f"{split}.jsonl")
    write_jsonl(world["demo"], demo)
    chats = rows + world["train"] + world["val"]
    train_tiny_tokenizer(chats, extra_texts=tokenizer_texts()).save_pretrained(dest / TINY_TOKENIZER.name)


# ---------------------------------------------------------------------------- model
def _shape(shape: str) -> dict:
    from phi3lit.errors import ConfigError

    if shape not in TINY_SHAPES:
        raise ConfigError(f"--shape {shape}: unknown; one of {', '.join(TINY_SHAPES)}")
    return TINY_SHAPES[shape]


def build_tiny_model(
    out: Path,
    seed: int = 0,
    tokenizer_dir: str | Path = TINY_TOKENIZER,
    shape: str = "mini-4k",
    pretrain_steps: int = 0,
) -> Path:
    """Save a seeded tiny `Phi3ForCausalLM` plus the tokenizer (the shipped tiny one by default): random-init, or
    pretrained for `pretrain_steps` steps on the lab's world (`phi3lit.tiny.pretrain`)."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Phi3Config(
        vocab_size=64 * ((len(tokenizer) + 63) // 64),  # padded like Phi-3's 32,064 rows
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Phi3ForCausalLM"],
        **_shape(shape),
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    if pretrain_steps:
        from phi3lit.tiny.pretrain import pretrain_world

        chats = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in read_jsonl(TINY_DATA)]
        pretrain_world(model, tokenizer, chats, steps=pretrain_steps, seed=seed)
    # Built in a temporary folder and renamed: concurrent processes (DDP ranks) never see half a model, and the
    # first of them to finish wins (the others' copies are identical).
    with atomic_folder(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def tiny(
    out: str, tokenizer: str = str(TINY_TOKENIZER), seed: int = 0, shape: str = "mini-4k", pretrain_steps: int = 0
) -> Path:
    """Build a tiny Phi-3 (2 layers, hidden 256) with any tokenizer's vocabulary, for offline dry runs and labs.

    `python -m phi3lit tiny --tokenizer DIR --out DIR`, then `fit --model.pretrained DIR`: masks, packing and the
    whole recipe run on your own tokenizer in minutes on a CPU, before any GPU time. With `--pretrain_steps N` the
    model is pretrained on the lab's world first (`phi3lit.tiny.pretrain`): `builtin:tiny-phi3` is this command with
    the shipped tokenizer, seed 0 and 600 steps.

    Args:
        out: folder to write the model and a copy of the tokenizer to; it must not exist yet.
        tokenizer: a tokenizer folder (tokenizer.json + tokenizer_config.json; a model folder works too) or hub id;
            the shipped tiny tokenizer by default.
        seed: seed of the random initialisation and of the pretraining data.
        shape: which family member's structure to copy at toy size: mini-4k (Phi-3-mini-4k), mini-128k
            (Phi-3-mini-128k and Phi-3.5-mini: LongRoPE), medium-4k (Phi-3-medium-4k: grouped-query attention),
            medium-128k (both), phi4-mini (Phi-4-mini: GQA, LongRoPE, partial rotary, tied embeddings).
        pretrain_steps: steps of pretraining every weight on the lab's world; 0 leaves the model random-init.
    """
    from phi3lit.errors import ConfigError, missing_model

    _shape(shape)  # an unknown shape fails before anything is read
    target = Path(out)
    if target.exists():
        raise ConfigError(f"--out {out}: already exists; choose a new folder")
    try:
        build_tiny_model(target, seed, tokenizer, shape, pretrain_steps)
    except OSError as e:
        raise missing_model(tokenizer, e) from None
    print(f"[phi3lit] tiny Phi-3 with the vocabulary of {tokenizer} written to {target}; use it with "
          f"--model.pretrained {target}")  # fmt: skip
    return target
