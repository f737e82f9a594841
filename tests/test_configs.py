"""Every YAML in configs/ and experiments/ parses and instantiates; the real config builds on the real shape; every
dotted name in a YAML imports; `--print_config` prints the run that runs."""

import importlib
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT

from phi3lit.__main__ import main
from phi3lit.cli import Phi3LitCLI
from phi3lit.data import ChatDataModule
from phi3lit.model.lora import apply_lora
from phi3lit.model.module import Phi3LoRA

# Overlays, combined with a config: strategies and QLoRA. Model overlays go on the recipe.
FRAGMENTS = sorted(
    [*(ROOT / "configs" / "strategy").glob("*.yaml"), *(ROOT / "configs" / "quantization").glob("*.yaml")]
)
RECIPE = ROOT / "configs" / "recipe.yaml"
MODELS = sorted((ROOT / "configs" / "models").glob("*.yaml"))
RUNS = [(ROOT / "configs" / "tiny.yaml",), (RECIPE,), *((RECIPE, m) for m in MODELS)]
SWEEPS = sorted((ROOT / "experiments").rglob("*.yaml"))
ALL_YAML = sorted([*(ROOT / "configs").rglob("*.yaml"), *SWEEPS])


def build(config: Path, tmp_path, *extra: str) -> Phi3LitCLI:
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path), *extra]
    return Phi3LitCLI(Phi3LoRA, ChatDataModule, run=False, auto_configure_optimizers=False, args=args)


def test_every_config_file_is_a_run_or_an_overlay():
    tested = {*FRAGMENTS, *(p for run in RUNS for p in run)}
    assert sorted((ROOT / "configs").rglob("*.yaml")) == sorted(tested)


@pytest.mark.parametrize("files", RUNS, ids=["+".join(p.stem for p in run) for run in RUNS])
def test_config_parses_and_instantiates(files, tmp_path):
    overlays = [w for p in files[1:] for w in ("--config", str(p))]
    cli = build(files[0], tmp_path, *overlays)
    assert isinstance(cli.model, Phi3LoRA) and isinstance(cli.datamodule, ChatDataModule)
    assert cli.model.model is None  # parsing never loads weights
    # Linked, not repeated: the data side always sees the model's tokenizer.
    assert cli.datamodule.hparams.tokenizer == cli.model.hparams.pretrained
    if len(files) > 1:  # a model overlay switches the model and names its own run folder
        overlay = yaml.safe_load(files[1].read_text())
        assert cli.model.hparams.pretrained == overlay["model"]["pretrained"]
        assert f"runs/{files[1].stem}-lora" == overlay["trainer"]["default_root_dir"]


# The dotted names a YAML can hold: class paths and the values of keys that name a class or callable.
DOTTED = re.compile(r"^(?:phi3lit|torch|lightning|transformers|peft)(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")


def dotted_names(node) -> list[str]:
    if isinstance(node, dict):
        return [n for v in node.values() for n in dotted_names(v)]
    if isinstance(node, list):
        return [n for v in node for n in dotted_names(v)]
    return [node] if isinstance(node, str) and DOTTED.match(node) else []


def resolves(name: str) -> bool:
    module, attr = name, []
    while module:
        try:
            obj = importlib.import_module(module)
        except ImportError:
            module, _, last = module.rpartition(".")
            attr.insert(0, last)
            continue
        for a in attr:
            if not hasattr(obj, a):
                return False
            obj = getattr(obj, a)
        return True
    return False


@pytest.mark.parametrize("path", ALL_YAML, ids=[str(p.relative_to(ROOT)) for p in ALL_YAML])
def test_every_dotted_name_in_a_yaml_imports(path):
    """A class moved or renamed fails here, not on a user's GPU: every `phi3lit.x.Y` (or torch, lightning, ...)
    named in the YAML, comments included (they show users what to write), imports."""
    text = path.read_text()
    names = dotted_names(yaml.safe_load(text))
    names += [w.strip("`'\",.;:()[]") for w in re.findall(r"\bphi3lit\.[\w.]+", text)]
    names = sorted({n.rstrip(".") for n in names})
    assert [n for n in names if not resolves(n)] == []


def test_the_dotted_name_check_finds_a_moved_class():
    assert resolves("phi3lit.model.rope.DocumentLongRoPE") and resolves("torch.optim.AdamW")
    assert not resolves("phi3lit.family.DocumentLongRoPE") and not resolves("phi3lit.nowhere.Thing")


def test_real_config_builds_phi3_mini_on_meta(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    cli = build(RECIPE, tmp_path, "--config", str(ROOT / "configs" / "models" / "phi3-mini-4k.yaml"))
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


def test_print_config_prints_the_run_that_runs(tmp_path, capsys):
    """`fit --print_config` prints the complete Trainer phi3lit runs (its logger, progress bar and checkpoint IO
    included), and running the printed file gives the same run: the same resolved config and the same weights."""
    from safetensors.torch import load_file

    tiny = ROOT / "configs" / "tiny.yaml"
    short = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--samples.prompts", "[]"]
    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(tiny), *short, "--trainer.default_root_dir", str(tmp_path / "b"), "--print_config"]
        )
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    trainer = yaml.safe_load(printed.read_text())["trainer"]
    assert trainer["logger"] == {"class_path": "phi3lit.run.monitor.RunTensorBoard", "init_args": {"run_dir": None}}
    assert [c["class_path"] for c in trainer["callbacks"]] == ["phi3lit.run.progress.StepProgressBar"]
    assert [p["class_path"] for p in trainer["plugins"]] == ["phi3lit.checkpoint.AtomicCheckpointIO"]
    main(["fit", "--config", str(tiny), *short, "--trainer.default_root_dir", str(tmp_path / "a")])
    main(["fit", "--config", str(printed)])  # nothing else: the printed file is the whole run
    configs = [yaml.safe_load((tmp_path / run / "config.yaml").read_text()) for run in ("a", "b")]
    for config in configs:  # the run folder, and the logger's folder in it, differ
        assert config["trainer"].pop("default_root_dir") == config["trainer"]["logger"]["init_args"].pop("run_dir")
    assert configs[0] == configs[1]
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (tmp_path / "b" / "tb").is_dir() and (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[p.name for p in FRAGMENTS])
def test_strategy_fragments_compose_with_model_configs(fragment, capsys):
    for base in ("tiny.yaml", "recipe.yaml"):
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
    cli = build(RECIPE, tmp_path, *overlay)
    assert cli.model.hparams.quantization == "nf4" and cli.model.hparams.torch_dtype == "bfloat16"
    if importlib.util.find_spec("bitsandbytes") is None:
        from phi3lit.model.quantization import quantization_config

        with pytest.raises(EnvironmentProblem, match=r"pip install 'phi3lit\[qlora\]'"):
            quantization_config("nf4")


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_point_parses(sweep, capsys, tmp_path):
    from phi3lit.tools.sweep.grid import fit_args, load_sweep, points

    spec = load_sweep(sweep)
    spec["root"] = str(tmp_path)
    assert sweep.read_text().startswith("#") and "python -m phi3lit ablate" in sweep.read_text().split("\n")[2]
    for point in points(spec):
        with pytest.raises(SystemExit) as e:
            main([*fit_args(spec, point, False), "--print_config"])
        assert e.value.code in (0, None), point["name"]
        assert f"default_root_dir: {tmp_path}" in capsys.readouterr().out
