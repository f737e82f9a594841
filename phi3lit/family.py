"""The Phi-3 family that phi3lit fine-tunes: every member is a `Phi3ForCausalLM` in transformers.

`FAMILY` holds, per hub id, the architecture values of the model's `config.json` (so `plan` counts parameters
and estimates memory offline, on the meta device), its chat template, and where each value was read. No hub
access was available when this table was written: the values were read from verbatim copies of the hub files
in public repositories (named in `source`), and every entry cites the hub file itself (`url`).

What differs between the members, and what phi3lit does about it:

* **Grouped-query attention** (Phi-3-medium: 40 query / 10 KV heads; Phi-4-mini: 24 / 8). `qkv_proj` then has
  unequal slices (q: heads x head_dim rows, k and v: kv_heads x head_dim rows each); `phi3lit.model.lora.slice_rows`
  reads them from the config, and `sdpa_docs` hands the KV heads to SDPA with `enable_gqa`.
* **LongRoPE** (the 128k models, Phi-3.5-mini, Phi-4-mini). transformers rescales RoPE with `short_factor` or
  `long_factor`, chosen from `max(position_ids) + 1` over the *whole batch*. A packed row restarts positions at
  every conversation, so stock transformers picks the long factors for every conversation (and every row) of a
  batch as soon as one conversation, or one padding run, is longer than `original_max_position_embeddings`.
  What inference sees is one conversation at a time: a conversation of L tokens is encoded with the long factors
  exactly when L > original_max_position_embeddings. `phi3lit.model.rope.install_document_rope` makes training do the
  same, per conversation (`DocumentLongRoPE`); with every conversation short it is bit-identical to stock transformers.
* **Partial rotary** (Phi-4-mini: 0.75 of each 128-wide head is rotated). Handled by transformers; the LongRoPE
  factor lists have head_dim * partial_rotary_factor / 2 entries, which `DocumentLongRoPE` inherits.
* **Tied embeddings** (Phi-4-mini: `lm_head.weight` is `embed_tokens.weight`). See `phi3lit.model.lora` for what
  LoRA on `lm_head` / `embed` and `modules_to_save` mean then, and `check_tied_targets`.
* **Chat templates.** Phi-3-medium's template has no system role: a system message is dropped without a trace.
  `phi3lit.data.chat.render_system_message` folds it into the first user turn (as the Phi-3 cookbook and
  llama.cpp's Phi-3 handling do) with a warning, so no instruction vanishes; `system_role_supported` tells the
  templates apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phi3lit.errors import ConfigError

HUB = "https://huggingface.co/{}/blob/main/{}"


@dataclass(frozen=True)
class Member:
    """One supported model: its config.json values, chat template, shipped config and where all of it was read."""

    hub_id: str
    config: dict  # the architecture fields of config.json, verbatim (rope_scaling included)
    source: str  # where the config.json values were read (no hub access here)
    chat_template: str
    template_source: str
    recipe: str  # its model overlay, configs/models/<model>.yaml, on configs/recipe.yaml
    tiny_shape: str  # phi3lit.tiny.TINY_SHAPES key with the same structural features
    published: str  # the size the model card states
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return HUB.format(self.hub_id, "config.json")

    @property
    def template_url(self) -> str:
        return HUB.format(self.hub_id, "tokenizer_config.json")


# ---------------------------------------------------------------------------- chat templates (verbatim)
# microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json (the tiny tokenizer ships it too: phi3lit.tiny).
MINI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# microsoft/Phi-3.5-mini-instruct: a system message is rendered only when it has content.
PHI35_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# microsoft/Phi-3-medium-4k-instruct and -128k-instruct: no system branch (a system message renders as nothing),
# the user turn opens the assistant header itself, no eos at the end.
MEDIUM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"  # noqa: E501
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)
# microsoft/Phi-4-mini-instruct: no newline after the role tags; tools ride on the system message.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# ---------------------------------------------------------------------------- config.json values (verbatim)
_PHI3 = dict(
    vocab_size=32064, bos_token_id=1, eos_token_id=32000, rms_norm_eps=1e-05, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu",
)  # fmt: skip
_MINI = dict(_PHI3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)  # fmt: skip
_MEDIUM = dict(_PHI3, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
               num_key_value_heads=10)  # fmt: skip

# Phi-3-mini-128k-instruct, the revision (transformers 4.39.3, "type": "su") that dotnet/machinelearning ships.
MINI_128K_LONG = [
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
    1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
    1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164,
    5.489999771118164, 9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
    15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203,
    32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
    56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844,
    61.190006256103516, 61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
    63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625,
    64.80001068115234, 64.81001281738281, 64.81001281738281,
]  # fmt: skip
MINI_128K_SHORT = [
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1500000000000001, 1.2000000000000002, 1.2500000000000002, 1.3000000000000003,
    1.3500000000000003, 1.5000000000000004, *[2.000000000000001] * 21, *[2.0500000000000007] * 3,
    *[2.1000000000000005] * 3, 2.1500000000000004, 2.1500000000000004, 2.3499999999999996, 2.549999999999999,
    2.5999999999999988, 2.5999999999999988, 2.7499999999999982, 2.849999999999998, 2.849999999999998,
    2.9499999999999975,
]  # fmt: skip
PHI35_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]  # fmt: skip
PHI35_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, *[1.0499999523162842] * 5,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094,
    1.1699998378753662, 1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378,
    1.8199998140335083, 1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
    1.9899996519088745, *[2.0199997425079346] * 6, *[2.0299997329711914] * 9, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]  # fmt: skip
MEDIUM_128K_LONG = [
    *[1.0] * 13, 1.25, 1.25, 1.5, 2.0, 2.75, 5.75, 5.75, 6.5, 9.25, 11.0, 13.25, 19.25, 19.75, 19.75, 21.25, 21.5,
    26.5, 30.0, 33.75, 35.25, 38.5, 42.0, 42.25, 46.0, 47.0, 50.0, 50.5, 51.0, 52.0, 52.75, 53.75, 54.75, 57.0,
    57.25, 58.5, 59.25, 59.5, 62.0, 62.5, 62.75, 63.25, 63.25, 63.25, 63.75, 64.0, 64.0, 64.25, 64.5, 64.5, 65.0,
    65.0,
]  # fmt: skip
MEDIUM_128K_SHORT = [
    1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.01, 1.02, 1.02, 1.04, 1.04, 1.07, 1.07, 1.1, 1.3000000000000003,
    1.3000000000000003, 1.5000000000000004, 1.5700000000000005, 1.9000000000000008, 2.3100000000000014,
    2.759999999999992, 3.3899999999999784, 3.9399999999999666, 4.009999999999965, 4.289999999999959,
    4.349999999999958, 5.349999999999937, 6.659999999999909, 7.029999999999901, 7.51999999999989, 8.00999999999988,
    8.249999999999876, 8.279999999999875, 9.629999999999846, 9.89999999999984, 10.589999999999826,
    11.049999999999816, 11.7899999999998, 12.189999999999792, 12.889999999999777, 13.129999999999772,
    13.16999999999977, 13.20999999999977, 13.479999999999764, 13.539999999999763, 13.779999999999758,
    13.929999999999755, 14.429999999999744, 14.759999999999737, 15.149999999999729, 15.419999999999723,
    15.53999999999972, 15.659999999999718, 15.749999999999716, 15.759999999999716, 15.799999999999715,
    16.05999999999971, 16.079999999999714, 16.11999999999972, 16.11999999999972, 16.18999999999973,
    16.31999999999975, 16.539999999999786, 16.799999999999827,
]  # fmt: skip

FAMILY: dict[str, Member] = {
    m.hub_id: m
    for m in [
        Member(
            "microsoft/Phi-3-mini-4k-instruct",
            dict(
                _MINI,
                max_position_embeddings=4096,
                original_max_position_embeddings=4096,
                rope_scaling=None,
                sliding_window=2047,
                pad_token_id=32000,
            ),  # fmt: skip
            "dotnet/machinelearning src/Microsoft.ML.GenAI.Phi/Resource/Config/phi-3-mini-4k-instruct-config.json "
            "(verbatim copy); the same values were already in phi3lit.tools.plan",
            MINI_TEMPLATE,
            "the hub file, copied into phi3lit (the tiny tokenizer ships the same text)",
            "configs/models/phi3-mini-4k.yaml",
            "mini-4k",
            "3.8B",
        ),
        Member(
            "microsoft/Phi-3-mini-128k-instruct",
            dict(
                _MINI,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                sliding_window=262144,
                pad_token_id=32000,
                rope_scaling={"long_factor": MINI_128K_LONG, "short_factor": MINI_128K_SHORT, "type": "su"},
            ),  # fmt: skip
            "dotnet/machinelearning src/Microsoft.ML.GenAI.Phi/Resource/Config/phi-3-mini-128k-instruct-config.json "
            "(verbatim copy of the April 2024 revision)",
            MINI_TEMPLATE,
            "not read for this model: the April 2024 revision had no system branch (huggingface fixture copies); "
            "the current hub file is assumed to match Phi-3-mini-4k's (the June 2024 update)",
            "configs/models/phi3-mini-128k.yaml",
            "mini-128k",
            "3.8B",
            (
                "rope factors are those of the April 2024 revision; the hub's June 2024 update changed them (and "
                "'su' to 'longrope'): factors change no parameter count",
            ),  # fmt: skip
        ),
        Member(
            "microsoft/Phi-3.5-mini-instruct",
            dict(
                _MINI,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                sliding_window=262144,
                pad_token_id=32000,
                rope_scaling={"long_factor": PHI35_LONG, "short_factor": PHI35_SHORT, "type": "longrope"},
            ),  # fmt: skip
            "NVIDIA/Fuser benchmarks/python/rope_ops.py (hf_phi3_rope quotes the config.json verbatim)",
            PHI35_TEMPLATE,
            "quoted verbatim in llama.cpp-style template tests (PHI3_5_CHAT_TEMPLATE) and BFCL's Phi handler",
            "configs/models/phi3.5-mini.yaml",
            "mini-128k",
            "3.8B",
        ),
        Member(
            "microsoft/Phi-3-medium-4k-instruct",
            dict(
                _MEDIUM,
                max_position_embeddings=4096,
                original_max_position_embeddings=4096,
                rope_scaling=None,
                sliding_window=2047,
                pad_token_id=32000,
            ),  # fmt: skip
            "dotnet/machinelearning src/Microsoft.ML.GenAI.Phi/Resource/Config/phi-3-medium-4k-instruct-config.json "
            "(verbatim copy); shape also in GenZ-LLM-Analyzer's model table",
            MEDIUM_TEMPLATE,
            "guidance-ai/guidance guidance/chat.py (phi3_medium_template, citing tokenizer_config.json#L119)",
            "configs/models/phi3-medium-4k.yaml",
            "medium-4k",
            "14B",
        ),
        Member(
            "microsoft/Phi-3-medium-128k-instruct",
            dict(
                _MEDIUM,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                sliding_window=131072,
                pad_token_id=None,
                rope_scaling={"long_factor": MEDIUM_128K_LONG, "short_factor": MEDIUM_128K_SHORT, "type": "su"},
            ),  # fmt: skip
            "dotnet/machinelearning src/Microsoft.ML.GenAI.Phi/Resource/Config/phi-3-medium-128k-instruct-config.json "
            "(verbatim copy)",
            MEDIUM_TEMPLATE,
            "a tokenizer-config fixture listing microsoft/Phi-3-medium-128k-instruct (same text as the 4k model's)",
            "configs/models/phi3-medium-128k.yaml",
            "medium-128k",
            "14B",
        ),
        Member(
            "microsoft/Phi-4-mini-instruct",
            dict(
                vocab_size=200064,
                hidden_size=3072,
                intermediate_size=8192,
                num_hidden_layers=32,
                num_attention_heads=24,
                num_key_value_heads=8,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                partial_rotary_factor=0.75,
                rope_theta=10000.0,
                rms_norm_eps=1e-05,
                tie_word_embeddings=True,
                sliding_window=262144,
                hidden_act="silu",
                bos_token_id=199999,
                eos_token_id=199999,
                pad_token_id=199999,
                # The 48 real factors were not found in any readable copy: 48 = 128 * 0.75 / 2 placeholders keep
                # the structure (LongRoPE, partial rotary) and change no parameter count.
                rope_scaling={"long_factor": [1.0] * 48, "short_factor": [1.0] * 48, "type": "longrope"},
            ),  # fmt: skip
            "Lightning-AI/litgpt litgpt/config.py (Phi-4-mini-instruct: n_embd 3072, n_layer 32, n_head 24, "
            "n_query_groups 8, rotary_percentage 0.75, padded_vocab_size 200064, block_size 131072, intermediate "
            "8192, sliding window 262144+1) and test fixtures quoting config.json (tie_word_embeddings true, "
            "original_max_position_embeddings 4096, rope_theta 10000, pad_token_id 199999); the long/short "
            "factors were NOT found",
            PHI4_MINI_TEMPLATE,
            "guidance-ai/guidance guidance/chat.py (phi_4_mini_template, citing tokenizer_config.json#L104)",
            "configs/models/phi4-mini.yaml",
            "phi4-mini",
            "3.8B",
            ("rope_scaling factors are placeholders of the real length (48); bos/eos 199999 taken from pad",),
        ),
    ]
}
_LOWER = {hub_id.lower(): hub_id for hub_id in FAMILY}


def member(name: str) -> Member | None:
    """The family member a hub id names (any case), or None. A local folder is never taken for a hub id."""
    return FAMILY.get(_LOWER.get(name.lower(), ""))


def phi3_config(name: str):
    """The transformers `Phi3Config` of a family member, built offline from its config.json values."""
    from transformers import Phi3Config

    found = member(name)
    if found is None:
        raise KeyError(name)
    values = dict(found.config)
    rope = values.pop("rope_scaling")
    if rope is not None:
        # transformers renames "su" (the 2024 name of LongRoPE) to "longrope" itself, but only after it has
        # checked the keys, so a "su" config fails to build in transformers 5; give it the current name.
        rope = {**rope, "type": "longrope" if rope["type"] == "su" else rope["type"]}
    config = Phi3Config(**values, rope_scaling=rope, architectures=["Phi3ForCausalLM"])
    config._name_or_path = found.hub_id
    return config


def supported_list() -> str:
    return ", ".join(FAMILY)


def check_phi3(config, name: str) -> None:
    """Refuse a model that is not a `Phi3ForCausalLM`: phi3lit's fused-projection LoRA, slices and plans assume it.

    Phi-3-small (`phi3small`, separate code), Phi-3.5-MoE (`phimoe`), Phi-4-multimodal (`phi4mm`), phi-2 (`phi`)
    and any other architecture are named in the message, with the supported list.
    """
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type == "phi3" and (not architectures or "Phi3ForCausalLM" in architectures):
        return
    what = f"architectures {', '.join(architectures)}" if architectures else "no architectures"
    raise ConfigError(
        f"model.pretrained={name!r}: its config names {what} and model_type {model_type!r}, not Phi3ForCausalLM. "
        f"phi3lit fine-tunes the Phi-3 family only (fused qkv_proj / gate_up_proj): {supported_list()}, or a "
        "folder with the same architecture"
    )
