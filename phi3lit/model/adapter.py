"""A saved peft adapter, read back: its adapter_config.json checked, and matched against the run's LoRA settings.

`model.adapter` (continue from an adapter), `chat --adapter`, the exports and `analyze` read adapters that a user
points at, so every read gives a one-line error naming the option and what is wrong, and a split export's relative
`base_model_name_or_path` (`./base`) is resolved beside the adapter without following a link phi3lit did not make.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3lit.errors import ConfigError
from phi3lit.model.lora import LoraSpec, peft_config


def read_adapter_config(folder: str, key: str) -> dict:
    """A peft adapter folder's adapter_config.json, or a one-line error naming `key` and what is wrong."""
    config = Path(folder) / "adapter_config.json"
    if not Path(folder).is_dir():
        raise ConfigError(f"{key} {folder}: no such folder (a run's adapter is at <run>/adapter)")
    if not config.is_file():
        raise ConfigError(f"{key} {folder}: no adapter_config.json there; is it a peft adapter folder?")
    try:
        cfg = json.loads(config.read_text())
        cfg["base_model_name_or_path"]  # noqa: B018 (every peft adapter config has it)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{config}: not a peft adapter config ({type(e).__name__}: {e})") from None
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{key} {folder}: no adapter_model.safetensors there")
    name = cfg["base_model_name_or_path"]
    if isinstance(name, str) and name.startswith(("./", "../")):  # relative to the adapter folder (split export)
        base = Path(folder) / name
        if base.is_symlink() or not base.is_dir():  # a link there was not made by phi3lit: not followed
            raise ConfigError(f"{config}: base_model_name_or_path {name!r} is not a folder beside the adapter "
                              f"({base}); move the whole export folder, base/ included")  # fmt: skip
        cfg["base_model_name_or_path"] = str(base.resolve())
    return cfg


def check_adapter_matches(saved, spec: LoraSpec, where: str) -> None:
    """A saved adapter's peft config must be the one `spec` describes, or its slice masks would be wrong."""
    expected = peft_config(spec)
    fields = {
        "r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
        "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern", "use_rslora": "use_rslora",
        "use_dora": "use_dora", "modules_to_save": "modules_to_save", "bias": "bias",
    }  # fmt: skip
    diffs = []
    for field_name, key in fields.items():
        a, b = getattr(saved, field_name), getattr(expected, field_name)
        if isinstance(a, list | set | tuple) or isinstance(b, list | set | tuple):
            a, b = sorted(a or []), sorted(b or [])
        if key == "targets":  # the saved side names modules; the spec may name slices (q, v) of them
            mismatch = a != b or saved.rank_pattern != expected.rank_pattern
        else:
            mismatch = (a or None) != (b or None) if isinstance(a, dict | list) else a != b
        if mismatch:
            diffs.append(f"{field_name}: adapter {a!r}, model.lora gives {b!r} (model.lora.{key})")
    if diffs:
        raise ConfigError(
            f"model.adapter={where!r} was trained with other LoRA settings than model.lora: "
            + "; ".join(diffs)
            + ". Set model.lora to the adapter's settings (its run's config.yaml has them)."
        )
