"""Every YAML in configs/ and experiments/ parses and instantiates; the real config builds on the real shape."""

from pathlib import Path

import pytest
import torch
from helpers import ROOT

from phi3lit.cli import Phi3LitCLI
from phi3lit.commands import main
from phi3lit.data import ChatDataModule
from phi3lit.lora import apply_lora
from phi3lit.model import Phi3LoRA

# Overlays, combined with a model config: strategies and QLoRA.
FRAGMENTS = sorted(
    [*(ROOT / "configs" / "strategy").glob("*.yaml"), *(ROOT / "configs" / "quantization").glob("*.yaml")]
)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p not in FRAGMENTS)
SWEEPS = sorted((ROOT / "experiments").rglob("*.yaml"))


def build(config: Path, tmp_path, *extra: str) -> Phi3LitCLI:
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path), *extra]
    return Phi3LitCLI(Phi3LoRA, ChatDataModule, run=False, auto_configure_optimizers=False, args=args)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_parses_and_instantiates(config, tmp_path):
    cli = build(config, tmp_path)
    assert isinstance(cli.model, Phi3LoRA) and isinstance(cli.datamodule, ChatDataModule)
    assert cli.model.model is None  # parsing never loads weights
    # Linked, not repeated: the data side always sees the model's tokenizer and max length.
    assert cli.datamodule.hparams.tokenizer == cli.model.hparams.pretrained
    assert cli.datamodule.hparams.max_length == cli.model.hparams.max_length


def test_real_config_builds_phi3_mini_on_meta(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    cli = build(ROOT / "configs" / "phi3-mini-4k-lora.yaml", tmp_path)
    hp = cli.model.hparams
    assert hp.pretrained == "microsoft/Phi-3-mini-4k-instruct" and hp.torch_dtype == "bfloat16"
    assert cli.datamodule.hparams.max_length == 4096
    assert cli.trainer.precision == "bf16-mixed"
    # Phi-3-mini-4k-instruct's config.json, without downloading it.
    config = Phi3Config(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, sliding_window=2047,
    )  # fmt: skip
    with torch.device("meta"):
        model = apply_lora(Phi3ForCausalLM(config), cli.model.lora)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 25_165_824


def test_print_config_is_rerunnable(tmp_path, capsys):
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tiny), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "lora:" in printed.read_text() and "pretrained: builtin:tiny-phi3" in printed.read_text()
    assert "max_steps: 150" in printed.read_text()
    main(["fit", "--config", str(printed), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)])
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and (tmp_path / "adapter").is_dir()


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[p.name for p in FRAGMENTS])
def test_strategy_fragments_compose_with_model_configs(fragment, capsys):
    for base in ("tiny.yaml", "phi3-mini-4k-lora.yaml"):
        with pytest.raises(SystemExit) as e:  # parse, validate and print; no instantiation (GPU/extras)
            main(["fit", "--config", str(ROOT / "configs" / base), "--config", str(fragment), "--print_config"])
        assert e.value.code in (0, None)
        printed = capsys.readouterr().out
        assert ("quantization: nf4" if fragment.parent.name == "quantization" else "strategy:") in printed


def test_ddp_fragment_instantiates_on_cpu(tmp_path):
    cli = build(ROOT / "configs" / "tiny.yaml", tmp_path, "--config", str(ROOT / "configs" / "strategy" / "ddp.yaml"))
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"


def test_qlora_config_wiring(tmp_path):
    import importlib.util

    from phi3lit.errors import EnvironmentProblem

    overlay = ["--config", str(ROOT / "configs" / "quantization" / "qlora.yaml")]
    cli = build(ROOT / "configs" / "phi3-mini-4k-lora.yaml", tmp_path, *overlay)
    assert cli.model.hparams.quantization == "nf4" and cli.model.hparams.torch_dtype == "bfloat16"
    if importlib.util.find_spec("bitsandbytes") is None:
        from phi3lit.quantization import quantization_config

        with pytest.raises(EnvironmentProblem, match=r"pip install 'phi3lit\[qlora\]'"):
            quantization_config("nf4")


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_point_parses(sweep, capsys, tmp_path):
    from phi3lit.sweep import fit_args, load_sweep, points

    spec = load_sweep(sweep)
    spec["root"] = str(tmp_path)
    assert sweep.read_text().startswith("#") and "python -m phi3lit ablate" in sweep.read_text().split("\n")[2]
    for point in points(spec):
        with pytest.raises(SystemExit) as e:
            main([*fit_args(spec, point, False), "--print_config"])
        assert e.value.code in (0, None), point["name"]
        assert f"default_root_dir: {tmp_path}" in capsys.readouterr().out
