"""A saved run, read back: its resolved config (`<run>/config.yaml`) as typed values, and which settings define it.

`fit` writes the complete resolved config into the run folder. Everything that reads a run afterwards (`analyze`,
a sweep's summary, the resume check) reads it through `SavedRun`, so a key is spelled in one place and a missing or
damaged file is handled one way: {} for a summary, which goes on with what it has; a one-line error with `strict`
for the commands that rely on it.

`RUN_DEFINING` lists the settings that decide what a run trains on and how (the base model, the LoRA shape, the
data, its split, lengths and order, the seed, the accumulation). A resume may not change them
(`phi3lit.run.resume` refuses, unless `--accept_changes true`), and the data module keeps the data ones in its
checkpoints with digests of the data itself (`phi3lit.data.module`), so that a resume outside the CLI is checked too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phi3lit.errors import ConfigError

RUN_DEFINING = (  # prefixes of the dotted config keys: a base model or data other than the first steps trained on
    "model.pretrained", "model.torch_dtype", "model.quantization", "model.lora.", "model.adapter",
    "data.train_file", "data.val_file", "data.val_fraction", "data.test_file", "data.split", "data.val_split",
    "data.tokenizer", "data.max_length", "data.train_on", "data.seed", "data.format", "data.hub_config",
    "data.on_bad_example", "data.truncation", "seed_everything", "trainer.accumulate_grad_batches",
)  # fmt: skip
# Where the data comes from: the data module compares digests of what was read instead, so a moved file resumes.
DATA_SOURCES = ("data.train_file", "data.val_file", "data.test_file", "data.split", "data.val_split",
                "data.hub_config", "data.tokenizer")  # fmt: skip


def data_fingerprint_settings() -> tuple[str, ...]:
    """The data module's own run-defining settings (names without `data.`), kept in its checkpoints."""
    return tuple(k.removeprefix("data.") for k in RUN_DEFINING if k.startswith("data.") and k not in DATA_SOURCES)


@dataclass(frozen=True)
class SavedRun:
    """A run folder's resolved config. `get("a.b.c")` is the one dotted lookup; the properties name what the tools
    read. Values are as the YAML holds them; absent keys are None (or the given default)."""

    folder: Path
    config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | Path, strict: bool = False) -> SavedRun:
        """`<folder>/config.yaml` as fit wrote it; {} before the run started. An unreadable file (not UTF-8, not
        YAML, not a mapping) is {} too, or with `strict` a one-line ConfigError naming the file."""
        import yaml

        folder = Path(folder)
        path = folder / "config.yaml"
        try:
            config = yaml.safe_load(path.read_bytes().decode()) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            if strict:
                why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0]
                raise ConfigError(f"{path}: cannot read the run's config ({why}); restore it or move it away") from None
            config = {}
        if config is not None and not isinstance(config, dict):
            if strict:
                raise ConfigError(f"{path}: the run's config holds no mapping; restore it or move it away")
            config = {}
        return cls(folder, config or {})

    def get(self, key: str, default=None):
        """`config["a"]["b"]["c"]` for key `a.b.c`, or `default` where the path does not exist."""
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def seed(self):
        return self.config.get("seed_everything")

    @property
    def lora_rank(self) -> int | None:
        return self.get("model.lora.r")

    @property
    def lora_targets(self) -> list[str] | None:
        targets = self.get("model.lora.targets")
        return [targets] if isinstance(targets, str) else targets

    @property
    def tokens_per_step(self) -> int | None:
        """Token slots one optimizer step trains on: packed rows x row length x accumulation x devices x nodes.

        `trainer.devices` other than a count or a list (auto, -1) is counted as one device."""
        batch, length = _number(self.get("data.batch_size")), _number(self.get("data.max_length"))
        if not batch or not length:
            return None
        accumulate = _number(self.get("trainer.accumulate_grad_batches")) or 1
        devices = self.get("trainer.devices")
        if isinstance(devices, list):
            devices = len(devices)
        elif not (isinstance(devices, int) and devices > 0):  # auto, -1, a string
            devices = 1
        nodes = _number(self.get("trainer.num_nodes")) or 1
        return int(batch * length * accumulate * devices * nodes)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
