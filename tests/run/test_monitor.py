"""What a researcher watches: TensorBoard scalars, hparams, text samples, curves; token-weighted metrics."""

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from phi3lit.data import ChatDataModule, collate
from phi3lit.model.lora import LoraSpec
from phi3lit.model.module import Phi3LoRA
from phi3lit.tiny import TINY_DATA

TRAIN_TAGS = [
    "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/trained_tokens_per_sec",
    "train/mfu", "train/padding_efficiency", "train/peak_memory_gb",
]  # fmt: skip
VAL_TAGS = ["val/loss", "val/ppl", "val/token_acc"]
HP_TAGS = ["hp/val_loss", "hp/val_ppl", "hp/tokens_per_sec"]


def events(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_every_scalar_tag_is_logged(run_dir):
    acc = events(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert set(TRAIN_TAGS + VAL_TAGS + HP_TAGS) <= tags
    n_train = len(acc.Scalars("train/loss"))
    assert all(len(acc.Scalars(t)) == n_train for t in TRAIN_TAGS)  # every log_every_n_steps, together
    assert all(0 < e.value < 1.5 for e in acc.Scalars("train/mfu"))
    assert all(0.5 < e.value <= 1.0 for e in acc.Scalars("train/padding_efficiency"))
    last_val = acc.Scalars("val/loss")[-1].value
    assert abs(acc.Scalars("hp/val_loss")[-1].value - last_val) < 1e-6


def test_lora_update_norms_are_logged_at_every_validation(run_dir):
    """lora_norm/<module>: ‖scale·B·A‖_F over all layers; the last one is the saved adapter's, recomputed densely."""
    from safetensors.torch import load_file

    acc = events(run_dir)
    modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert {t for t in acc.Tags()["scalars"] if t.startswith("lora_norm/")} == {f"lora_norm/{m}" for m in modules}
    val_steps = [e.step for e in acc.Scalars("val/loss")]
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for m in modules:
        logged = acc.Scalars(f"lora_norm/{m}")
        assert [e.step for e in logged] == val_steps and all(e.value > 0 for e in logged)
        squares = 0.0
        for key in [k for k in weights if f"{m}.lora_A" in k]:
            delta = 2.0 * weights[key.replace("lora_A", "lora_B")] @ weights[key]  # scale alpha/r = 32/16
            squares += delta.double().pow(2).sum().item()
        assert abs(logged[-1].value - squares**0.5) <= 1e-4 * squares**0.5  # the last validation is at the end


def test_hparams_summary_holds_config_and_lora_facts(run_dir):
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = events(run_dir)
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = data.session_start_info.hparams
    assert hp["lora/r"].number_value == 16 and hp["lora/trainable_params"].number_value == 114_688
    assert hp["model.pretrained"].string_value == "builtin:tiny-phi3"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(HP_TAGS)
    assert "\n  lora:\n" in (run_dir / "config.yaml").read_text()  # the resolved config, beside checkpoints/


def test_text_samples_at_every_validation(run_dir):
    acc = events(run_dir)
    samples = acc.Tensors("samples/text_summary")
    assert len(samples) == 3  # three validations
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert "What is 12 + 30?" in text and "| prompt | reply |" in text


def test_curves_png(run_dir):
    png = run_dir / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves" in events(run_dir).Tags()["images"]


def test_validation_metrics_are_token_weighted(tiny_path, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(TINY_DATA.read_text().splitlines(keepends=True)[:30]))
    torch.manual_seed(0)
    module = Phi3LoRA(pretrained=tiny_path, lora=LoraSpec(dropout=0.0))
    dm = ChatDataModule(str(data), val_file=str(data), tokenizer=tiny_path, max_length=96, batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, dm)
    # Direct computation: every row separately, all token losses summed, divided by all trained tokens.
    total = n = correct = 0
    with torch.no_grad():
        rows = [dm.rows["val"][i] for i in range(len(dm.rows["val"]))]
        for row in rows:
            s, k, c = module.token_losses(collate([row], pad_id=0))
            total, n, correct = total + s.item(), n + k.item(), correct + c.item()
    batches = [rows[i : i + 3] for i in range(0, len(rows), 3)]
    assert len({sum(len(c["input_ids"]) for r in b for c in r) for b in batches}) > 1  # unequal batches
    assert abs(metrics["val/loss"] - total / n) < 1e-5
    assert abs(metrics["val/ppl"] - torch.exp(torch.tensor(total / n)).item()) < 1e-3
    assert abs(metrics["val/token_acc"] - correct / n) < 1e-6


def test_cpu_roof_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The ~3 s matmul measurement runs on a machine's first fit; later fits read it; a raised roof replaces it."""
    import json

    from phi3lit.run.monitor import cpu_roof

    monkeypatch.setenv("PHI3LIT_CACHE", str(tmp_path))
    rng = torch.get_rng_state()
    measured = cpu_roof(torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)  # a first run on a machine trains as the later ones do
    kept = json.loads((tmp_path / "peak_flops.json").read_text())
    (key,) = kept
    assert kept[key] == measured > 1e8 and "torch.float32" in key and f"{torch.get_num_threads()} threads" in key
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: 1.5e9}))
    assert cpu_roof(torch.float32) == 1.5e9  # read, not measured again
    assert cpu_roof(torch.float32, raised=2.5e9) == 2.5e9
    assert cpu_roof(torch.float32) == 2.5e9
    (tmp_path / "peak_flops.json").write_text("{not json")
    assert cpu_roof(torch.float32) > 1e8  # a damaged cache is measured over, not an error
