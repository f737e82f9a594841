"""The recipe matrix: every shipped config runs as users run it, and every setting has its observable effect.

Each case is `phi3lit fit --config configs/X.yaml [--config overlay ...]` through the CLI's entry point (in this
process; the DDP case as a command, since Lightning starts its second rank by re-running the command line), shrunk
only in model (`model.pretrained` -> the built-in tiny Phi-3), data (small local files instead of the hub dataset)
and length (`max_steps`, `max_length`, validation interval). Everything else, precision, clipping, checkpointing,
LoRA, optimizer, stays as shipped. A probe callback (tests/probes.py, added with `--trainer.callbacks+=` as a user adds
theirs) records what each step actually did, and the test asserts the effect of each setting: layers recomputed
and activation bytes saved (gradient checkpointing), the dtype the matmuls ran in (precision), gradient norm
after clipping (gradient_clip_val), train mode (dropout), and that the run trained (the adapter moved).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, run_main
from probes import probe_arg, read_probe
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.__main__ import main
from phi3lit.tiny import TINY_DATA

# A shipped run, as the docs launch it: tiny.yaml alone, or the recipe with one model overlay ("a.yaml+b.yaml").
MODELS = sorted(p.name for p in (ROOT / "configs" / "models").glob("*.yaml"))
CONFIGS = ["tiny.yaml", *(f"recipe.yaml+models/{m}" for m in MODELS)]
FLAGSHIP = "recipe.yaml+models/phi3-mini-4k.yaml"
LAYERS = 2  # the tiny model's decoder layers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("recipe-data")
    lines = TINY_DATA.read_text().splitlines(keepends=True)
    train, val = tmp / "train.jsonl", tmp / "val.jsonl"
    train.write_text("".join(lines[:120]))
    val.write_text("".join(lines[120:160]))
    return train, val


def shrink(config: str, data: tuple[Path, Path], root: Path) -> list[str]:
    """Only model, data and length change; the shipped values of everything else are what is tested."""
    words = ["--data.train_file", str(data[0]), "--trainer.default_root_dir", str(root)]
    if shipped(config)["model"]["pretrained"] != "builtin:tiny-phi3":
        words += ["--model.pretrained", "builtin:tiny-phi3", "--data.val_file", str(data[1])]
        words += ["--data.max_length", "256", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"]
    return [*words, "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]"]


def fit(config: str, data, root: Path, *extra: str, config_files: tuple[str, ...] = ()) -> list[dict]:
    return fit_with_output(config, data, root, *extra, config_files=config_files)[0]


def fit_with_output(config: str, data, root: Path, *extra: str, config_files: tuple[str, ...] = ()):
    """Run the fit; return the probe's records and what the run printed, logged and warned."""
    probe = root.parent / f"{root.name}.probe.jsonl"
    configs = [w for c in (*config.split("+"), *config_files) for w in ("--config", str(ROOT / "configs" / c))]
    args = ["fit", *configs, *shrink(config, data, root), *extra, *probe_arg("TrainingStepFacts", probe)]
    if "strategy/ddp.yaml" in config_files:  # Lightning's launcher re-runs the command line for rank 1
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        cmd = [sys.executable, "-m", "phi3lit", *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        output = proc.stdout + proc.stderr
    else:
        output = run_main(args)
    assert "eval mode at the start of training" not in output
    return read_probe(probe), output


def adapter_moved(root: Path) -> bool:
    weights = load_file(root / "adapter" / "adapter_model.safetensors")
    return any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


def shipped(config: str) -> dict:
    """The config the files of `config` ("a.yaml+b.yaml") compose to, later files over earlier ones."""
    merged: dict = {}
    for name in config.split("+"):
        for key, value in yaml.safe_load((ROOT / "configs" / name).read_text()).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def needs(config: str, overlay: str | None = None):
    quantized = shipped(config)["model"].get("quantization") or (overlay and "quantization" in overlay)
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA needs bitsandbytes (pip install 'phi3lit[qlora]'); it quantizes on the CPU too")


# Overlays that run on a CPU, with their extra words: DDP on 2 processes (gloo), QLoRA (bitsandbytes quantizes on CPU).
OVERLAYS = {"strategy/ddp.yaml": ["--trainer.devices", "2"], "quantization/qlora.yaml": []}
CASES = [(c, None) for c in CONFIGS] + [(FLAGSHIP, overlay) for overlay in OVERLAYS]


@pytest.mark.parametrize("config, overlay", CASES, ids=[f"{c}+{o}" if o else c for c, o in CASES])
def test_every_shipped_config_runs_as_shipped_and_each_setting_takes_effect(config, overlay, data, tmp_path):
    needs(config, overlay)
    cfg = shipped(config)
    if overlay:
        for key, value in yaml.safe_load((ROOT / "configs" / overlay).read_text()).items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    files = (overlay,) if overlay else ()
    extra = OVERLAYS.get(overlay, [])
    steps, output = fit_with_output(config, data, tmp_path / "run", *extra, config_files=files)
    assert [s["step"] for s in steps][:3] == [1, 2, 3]  # rank 0's steps (the probe writes there only)
    # Counts are of the weights the model stands for, 4-bit packed ones included (QLoRA): the tiny model's
    # 1,869,056 base parameters plus 114,688 LoRA ones, whatever the storage.
    assert "trainable params: 114,688 || all params: 1,983,744" in output
    assert all(s["training_mode"] for s in steps)  # LoRA dropout and checkpointing need train mode
    # Gradient checkpointing: every layer is run again in backward, and far fewer activation bytes are kept.
    recomputed = sum(s["layer_forwards"]["backward"] for s in steps)
    if cfg["model"].get("gradient_checkpointing"):
        assert recomputed == LAYERS * len(steps)
    else:
        assert recomputed == 0
    # Precision: the frozen matmuls compute in the dtype the precision asks for; LoRA state stays fp32.
    precision = str(cfg["trainer"]["precision"])
    compute = "torch.bfloat16" if precision.startswith("bf16") else "torch.float32"
    assert {d for s in steps for d in s["matmul_dtypes"]} == {compute}
    assert {d for s in steps for d in s["lora_dtypes"]} == {"torch.float32"}
    # The fused LoRA layer runs where base, LoRA and input dtypes agree (32-true); under autocast, and for a 4-bit
    # base, peft's own forward runs (phi3lit.model.fused_lora).
    fused = precision == "32-true" and not cfg["model"].get("quantization")
    assert all((s["peft_forwards"] == 0) == fused for s in steps)
    if cfg["model"].get("quantization"):  # QLoRA: the frozen linear weights are stored packed 4-bit
        assert "torch.uint8" in {d for s in steps for d in s["base_dtypes"]}
    # Clipping: the gradient that reaches the optimizer is never longer than gradient_clip_val.
    clip = cfg["trainer"].get("gradient_clip_val")
    if clip:
        assert all(s["grad_norm_after_clip"] <= clip * (1 + 1e-4) for s in steps)
    assert adapter_moved(tmp_path / "run")


@pytest.mark.parametrize("fragment", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_gpu_only_strategies_say_so_on_a_cpu(fragment, data, tmp_path, capsys):
    """The overlays that cannot run here fail before loading anything, with one line naming what they need."""
    if "deepspeed" in fragment and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: the GPU checks in tests/e2e/test_gpu.py cover it")
    strategy = ["--config", str(ROOT / "configs" / "strategy" / fragment)]
    args = ["fit", *(w for c in FLAGSHIP.split("+") for w in ("--config", str(ROOT / "configs" / c)))]
    with pytest.raises(SystemExit) as e:
        main([*args, *strategy, *shrink(FLAGSHIP, data, tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "phi3lit: environment error: trainer.strategy" in err  # FSDP: GPUs only; DeepSpeed: the extra
    assert not (tmp_path / "run").exists()  # before loading anything


def test_gradient_checkpointing_keeps_fewer_activations(data, tmp_path):
    """The flagship config's checkpointing setting, on and off at the same length: the saved bytes drop."""
    config = FLAGSHIP
    on = fit(config, data, tmp_path / "on")
    off = fit(config, data, tmp_path / "off", "--model.gradient_checkpointing", "false")
    assert sum(s["layer_forwards"]["backward"] for s in off) == 0
    saved_on, saved_off = (sum(s["saved_bytes"] for s in run) for run in (on, off))
    assert saved_on < 0.5 * saved_off


def test_clipping_takes_effect_when_gradients_are_long(data, tmp_path):
    """gradient_clip_val below the gradient norms the run logs: every step reaches the optimizer clipped."""
    extra = ["--trainer.gradient_clip_val", "1e-3", "--trainer.log_every_n_steps", "1"]
    steps = fit("tiny.yaml", data, tmp_path / "run", *extra)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/grad_norm")]  # before clipping
    assert logged and min(logged) > 1e-2
    assert all(abs(s["grad_norm_after_clip"] - 1e-3) < 1e-6 for s in steps)


FP16_PLUGIN = {
    "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
    "init_args": {
        "precision": "16-mixed",
        "device": "cpu",
        "scaler": {"class_path": "torch.amp.GradScaler", "init_args": {"device": "cpu"}},
    },
}


def test_fp16_mixed_with_a_real_grad_scaler_and_the_shipped_clipping(data, tmp_path):
    """16-mixed as on a GPU (Lightning allows fp16 AMP only on CUDA, so the CPU run hands it the same plugin with a
    real GradScaler): fused AdamW + clipping run, the scaler's overflow steps are skipped without stopping the
    run, the gradient norm is logged unscaled, and the weights train."""
    extra = ["--trainer.precision", "null", "--trainer.plugins", json.dumps(FP16_PLUGIN), "--trainer.max_steps", "4"]
    extra += ["--trainer.log_every_n_steps", "1", "--data.max_length", "128"]  # fp16 matmuls are slow on a CPU
    steps = fit(FLAGSHIP, data, tmp_path / "run", *extra)
    assert {d for s in steps for d in s["matmul_dtypes"]} == {"torch.float16"}
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    norms = [e.value for e in acc.Scalars("train/grad_norm")]
    finite = [n for n in norms if n == n and n != float("inf")]
    assert finite and max(finite) < 1e3  # unscaled: a scaled norm would be ~65536 times larger
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert adapter_moved(tmp_path / "run")


def test_bf16_true_through_the_cli_keeps_lora_and_adamw_in_fp32(data, tmp_path):
    """`trainer.precision=bf16-true` casts the whole module; phi3lit brings LoRA (and so AdamW's state) back to fp32."""
    steps = fit("tiny.yaml", data, tmp_path / "run", "--trainer.precision", "bf16-true", "--trainer.max_steps", "2")
    assert {d for s in steps for d in s["matmul_dtypes"]} == {"torch.bfloat16"}
    assert {d for s in steps for d in s["base_dtypes"]} == {"torch.bfloat16"}
    assert {d for s in steps for d in s["lora_dtypes"]} == {"torch.float32"}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["optimizer_states"][0]["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_fused_lora_switch_through_the_cli(data, tmp_path):
    """`model.fused_lora` picks the LoRA forward a fit runs; with dropout 0 both paths train to the same weights."""
    common = ["--model.lora.dropout", "0", "--trainer.max_steps", "3"]
    fused = fit("tiny.yaml", data, tmp_path / "fused", *common)
    stock = fit("tiny.yaml", data, tmp_path / "stock", *common, "--model.fused_lora", "false")
    assert all(s["peft_forwards"] == 0 for s in fused) and all(s["peft_forwards"] > 0 for s in stock)
    a, b = (
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        for r in ("fused", "stock")
    )
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # trained: B left its zero start
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
