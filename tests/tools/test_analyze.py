"""analyze: the §7 quantities on synthetic adapters of known structure (φ, amplification, spectra), the seed
statistics and equal-token comparison of ablate, the training-time LoRA norms on a tiny peft model, and the
end-to-end path: two workers run a 2-point x 2-seed sweep, then `phi3lit analyze` reads it."""

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import ROOT, explain

from phi3lit.__main__ import main
from phi3lit.errors import ConfigError
from phi3lit.model.norms import lora_delta_norms
from phi3lit.tools.analysis.analyze import analyze as analyze_folder
from phi3lit.tools.analysis.deltas import load_updates, lowrank_svd, phi, subspace_similarity, update_metrics
from phi3lit.tools.sweep.ablate import ablate
from phi3lit.tools.sweep.grid import load_sweep, points
from phi3lit.tools.sweep.stats import at_equal_tokens, seed_stats, t975


def orthonormal_rows(n: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # n x d, orthonormal rows


# ---------------------------------------------------------------------------- φ
def test_phi_is_one_for_identical_subspaces_and_zero_for_orthogonal_ones():
    d = 96
    g = torch.Generator().manual_seed(0)
    a8 = torch.randn(8, d, generator=g, dtype=torch.float64)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64) + 4 * torch.eye(8, dtype=torch.float64)
    same = mix @ a8  # another basis (other singular values and vectors) of the same row space
    assert phi(a8, same, 8, 8) == pytest.approx(1.0, abs=1e-10)
    # r=8 inside r=64: the 8 directions of the small one lie in the 64 of the large one.
    a64 = torch.cat([same, torch.randn(56, d, generator=g, dtype=torch.float64)])
    assert phi(a8, a64, 8, 64) == pytest.approx(1.0, abs=1e-10)
    # Orthogonal row spaces: coordinates 0..7 against coordinates 8..71.
    basis = torch.eye(d, dtype=torch.float64)
    a_low = torch.randn(8, 8, generator=g, dtype=torch.float64) @ basis[:8]
    a_high = torch.randn(64, 64, generator=g, dtype=torch.float64) @ basis[8:72]
    matrix = subspace_similarity(a_low, a_high)
    assert matrix.shape == (8, 64) and float(matrix.abs().max()) < 1e-20
    # One shared direction out of 4 (the strongest of both): φ(1, 1) = 1, φ(4, 4) = 1/4.
    rows = orthonormal_rows(7, d, seed=1)
    a1 = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)) @ rows[[0, 1, 2, 3]]
    a2 = torch.diag(torch.tensor([5.0, 3, 2, 1], dtype=torch.float64)) @ rows[[0, 4, 5, 6]]
    assert phi(a1, a2, 1, 1) == pytest.approx(1.0, abs=1e-10)
    assert phi(a1, a2, 4, 4) == pytest.approx(0.25, abs=1e-10)
    assert phi(a1, a2, 2, 4) == pytest.approx(0.5, abs=1e-10)  # 1 of the top-2 directions of a1, over min(2, 4)


def test_phi_matrix_is_the_definition_for_every_i_and_j():
    g = torch.Generator().manual_seed(3)
    a1, a2 = torch.randn(5, 40, generator=g), torch.randn(9, 40, generator=g)
    matrix = subspace_similarity(a1, a2)
    u1 = torch.linalg.svd(a1.double(), full_matrices=False)[2].T
    u2 = torch.linalg.svd(a2.double(), full_matrices=False)[2].T
    for i in range(1, 6):
        for j in range(1, 10):
            direct = torch.linalg.matrix_norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
            assert float(matrix[i - 1, j - 1]) == pytest.approx(float(direct), abs=1e-12)
    assert float(matrix.min()) >= 0 and float(matrix.max()) <= 1 + 1e-12
    # Random subspaces of dimensions i, j in d dimensions overlap about max(i, j) / d.
    d, ga = 4096, torch.Generator().manual_seed(4)
    r1, r2 = torch.randn(8, d, generator=ga), torch.randn(64, d, generator=ga)
    assert phi(r1, r2, 8, 64) == pytest.approx(64 / d, rel=0.3)


# ---------------------------------------------------------------------------- spectrum and amplification
def test_amplification_and_stable_rank_match_a_hand_computation():
    # ΔW = scale · B · A = 3 e0 e1ᵀ + 1 e2 e3ᵀ: singular values 3 and 1, U = [e0, e2], V = [e1, e3].
    e = torch.eye(6, dtype=torch.float64)
    b = torch.stack([3 * e[0], e[2]], dim=1) / 2  # 6 x 2
    a = torch.stack([e[1], e[3]])  # 2 x 6
    scale = 2.0
    w = torch.arange(36, dtype=torch.float64).reshape(6, 6) / 10
    m = update_metrics(b, a, scale, w)
    assert m["spectrum"] == pytest.approx([3.0, 1.0])
    assert m["dW_fro"] == pytest.approx(math.sqrt(10))
    assert m["stable_rank"] == pytest.approx(10 / 9)
    # Uᵀ W V picks rows 0, 2 and columns 1, 3 of W (signs of singular vectors do not change the norm).
    by_hand = math.sqrt(w[0, 1] ** 2 + w[0, 3] ** 2 + w[2, 1] ** 2 + w[2, 3] ** 2)
    assert m["UtWV_fro"] == pytest.approx(by_hand)
    assert m["amplification"] == pytest.approx(math.sqrt(10) / by_hand)
    assert m["W_fro"] == pytest.approx(float(torch.linalg.matrix_norm(w)))


def test_lowrank_svd_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(300, 6, generator=g), torch.randn(6, 200, generator=g)
    u, s, v = lowrank_svd(b, a, 0.5)
    dense = 0.5 * b.double() @ a.double()
    assert s.tolist() == pytest.approx(torch.linalg.svdvals(dense)[:6].tolist(), rel=1e-9)
    assert torch.allclose(u @ torch.diag(s) @ v.T, dense, atol=1e-9)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=torch.float64), atol=1e-10)


# ---------------------------------------------------------------------------- statistics over seeds
def test_mean_std_and_95_interval_arithmetic():
    st = seed_stats([1.0, 2.0, 3.0, 4.0])
    assert st["n"] == 4 and st["mean"] == 2.5
    assert st["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std: sum of squares 5, n - 1 = 3
    half = 3.182 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n)
    assert (st["lo"], st["hi"]) == pytest.approx((2.5 - half, 2.5 + half))
    two = seed_stats([6.0, 6.2])
    assert two["std"] == pytest.approx(0.2 / math.sqrt(2))
    assert two["hi"] - two["mean"] == pytest.approx(12.706 * 0.1)  # t(0.975, 1) * (0.2/√2) / √2
    one = seed_stats([5.0])
    assert one["mean"] == 5.0 and one["std"] is None and one["lo"] is None and one["hi"] is None
    assert seed_stats([])["mean"] is None
    assert t975(1000) == 1.980 and t975(35) == 2.042  # conservative beyond the table


def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=6e-4), df


def test_points_are_compared_at_equal_tokens_seen():
    curves = {
        "long": [(1000, 5.0), (2000, 4.0), (4000, 3.0)],  # trained on 4000 tokens; no validation at 3000
        "short": [(1500, 4.5), (3000, 3.5)],  # on 3000: the budget every point has seen
        "sparse": [(5000, 2.0)],  # no validation before the budget: no value
        "resumed": [(1000, 4.8), (3000, 9.9), (3000, 3.6), (6000, 3.0)],  # 3000 validated twice: the last counts
    }
    budget, values, where = at_equal_tokens({k: v for k, v in curves.items() if k != "sparse"})
    # "long" is interpolated between 2000 and 4000 (halfway: 3.5), not its 2000-token value.
    assert budget == 3000 and values == {"long": 3.5, "short": 3.5, "resumed": 3.6}
    assert where == {"long": (2000, 4000), "short": (3000, 3000), "resumed": (3000, 3000)}
    budget, values, where = at_equal_tokens(curves)
    assert budget == 3000 and values["sparse"] is None and where["sparse"] == (None, None)
    assert at_equal_tokens({}) == (None, {}, {})


# ---------------------------------------------------------------------------- norms during training
def test_lora_delta_norms_on_a_tiny_peft_model(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from phi3lit.model.lora import LoraSpec, apply_lora, slice_rows

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = apply_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0, targets=["q", "v", "o"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; give it values (in its slice blocks, as training would)
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                lb = module.lora_B["default"]
                lb.weight.copy_(torch.randn(lb.weight.shape, generator=g))
                if hasattr(lb, "slice_mask"):
                    lb.weight.mul_(lb.slice_mask)
    norms = lora_delta_norms(model)
    rows = slice_rows(base.config, "qkv_proj")
    expected = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_B") and "default" in module.lora_B):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
        delta = module.scaling["default"] * b @ a  # dense, as peft applies it
        if name.endswith("qkv_proj"):
            for s in ("q", "v"):
                expected[f"lora_norm/{s}/layer_{layer}"] = float(torch.linalg.matrix_norm(delta[slice(*rows[s])]))
            assert float(torch.linalg.matrix_norm(delta[slice(*rows["k"])])) == 0  # the k rows stay the base's
        else:
            expected[f"lora_norm/o_proj/layer_{layer}"] = float(torch.linalg.matrix_norm(delta))
    for kind in ("q", "v", "o_proj"):
        expected[f"lora_norm/{kind}"] = math.sqrt(sum(expected[f"lora_norm/{kind}/layer_{i}"] ** 2 for i in (0, 1)))
    assert norms.keys() == expected.keys()
    for key, value in expected.items():
        assert norms[key] == pytest.approx(value, rel=1e-5), key
    assert model.base_model.model.model.layers[0].self_attn.qkv_proj.scaling["default"] == 2.0  # alpha / r per slice

    # The saved adapter, read back by analyze without the run's config (slices detected from B), agrees.
    model.save_pretrained(tmp_path)
    updates, _ = load_updates(tmp_path, None, base.config)
    got = {}
    for u in updates:
        got[f"lora_norm/{u.kind}/layer_{u.layer}"] = update_metrics(u.b, u.a, u.scale, None)["dW_fro"]
    assert got.keys() == {k for k in expected if "/layer_" in k}
    for key, value in got.items():
        assert value == pytest.approx(expected[key], rel=1e-5), key
    assert all(u.rank == 4 for u in updates)


# ---------------------------------------------------------------------------- the command
def analyze(*args):
    cmd = [sys.executable, "-m", "phi3lit", "analyze", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_analyze_refuses_a_folder_without_adapters(tmp_path):
    missing = analyze(tmp_path / "nope")
    assert missing.returncode == 2 and missing.stderr.strip().startswith("phi3lit: config error: analyze:")
    assert len(missing.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="no adapter here"):
        analyze_folder(str(tmp_path))


DAMAGE = {  # file in the run folder -> (bytes to write, or a change to adapter_config.json; what the line says)
    "truncated": ("adapter/adapter_model.safetensors", None, "cannot read the adapter's tensors"),
    "garbage": ("adapter/adapter_model.safetensors", b"\xff" * 64, "cannot read the adapter's tensors"),
    "config_bad_r": ("adapter/adapter_config.json", {"r": None}, "r must be a positive number, got None"),
    "config_bad_alpha": ("adapter/adapter_config.json", {"lora_alpha": "x"}, "lora_alpha must be a positive number"),
    "config_yaml_not_utf8": ("config.yaml", b"model:\n  lora: \xff\xfe\n", "not UTF-8 text"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_analyze_on_a_damaged_run_is_one_line_naming_the_file(run_dir, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "adapter", run / "adapter")
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    name, data, expected = DAMAGE[case]
    path = run / name
    if data is None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif isinstance(data, dict):
        path.write_text(json.dumps(json.loads(path.read_text()) | data))
    else:
        path.write_bytes(data)
    err = explain(capsys, ["analyze", str(run)])
    assert len(err.strip().splitlines()) == 1 and str(path) in err and expected in err, err


def test_two_workers_run_a_2x2_seed_sweep_then_analyze(small_data, tmp_path):
    sweep = {
        "base": str(ROOT / "configs" / "tiny.yaml"),
        "root": str(tmp_path / "runs"),
        "name": "mini",
        "grid": {"model.lora.r": [4, 8]},
        "fixed": {
            "data.train_file": str(small_data), "data.max_length": 128, "trainer.max_steps": 4,
            "trainer.val_check_interval": 2, "checkpoint.every_n_train_steps": 2, "samples.prompts": [],
            "trainer.enable_progress_bar": False, "model.lora.targets": ["q", "v"], "model.lora.alpha": "2r",
            "model.lora.dropout": 0.0, "monitor.plot": False,
        },
        "seeds": [0, 1],
    }  # fmt: skip
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(sweep))
    names = [p["name"] for p in points(load_sweep(path))]
    out = tmp_path / "runs" / "mini"
    cmd = [sys.executable, "-m", "phi3lit", "ablate", str(path)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = out / names[0] / "status.json"
    deadline = time.monotonic() + 300
    while not (status.exists() and "running" in status.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # A second worker on the same sweep while the first runs point 0 (as overlapping SLURM array tasks).
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    first_out, _ = first.communicate(timeout=600)
    both = first_out + second.stdout
    assert first.returncode == 0 and second.returncode == 0, both[-3000:] + second.stderr[-2000:]
    assert f"{names[0]}: running in another process (pid {first.pid} " in second.stdout, second.stdout
    for name in names:  # every point ran exactly once, by one of the two workers
        assert both.count(f" {name}: ok  ") == 1, both
        assert (out / name / "fit.log").read_text().count("fit done: step 4/4") == 1

    runs = {r["r"] + "/" + r["seed"]: r for r in csv.DictReader((out / "summary.csv").open())}
    stats = list(csv.DictReader((out / "summary_stats.csv").open()))
    assert [s["r"] for s in stats] == ["4", "8"]
    for s in stats:
        values = [float(runs[f"{s['r']}/{seed}"]["eq_val_loss"]) for seed in (0, 1)]
        assert int(s["n_ok"]) == 2 and float(s["scale"]) == 2.0  # alpha = 2r: the same scale at every rank
        assert float(s["eq_val_loss_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert float(s["eq_val_loss_std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
        half = 12.706 * statistics.stdev(values) / math.sqrt(2)
        assert float(s["eq_val_loss_ci95_hi"]) == pytest.approx(statistics.fmean(values) + half, abs=1e-5)
    assert all(r["eq_tokens"] == r["tokens_seen"] == str(4 * 4 * 128) for r in runs.values())
    assert " ± " in (out / "summary.md").read_text() and (out / "summary.png").read_bytes()[:4] == b"\x89PNG"

    main(["analyze", str(out)])  # the command's entry point, in this process: returns on success
    assert torch.is_grad_enabled()  # it leaves the caller's autograd on
    report = (out / "analysis" / "analysis.md").read_text()
    assert "r=4 vs r=8 (mean over seeds 0, 1)" in report and "r=8, seeds 0 vs 1" in report
    for figure in ("phi_ranks__all__r4_vs_r8", "phi_seeds__all__r4", "phi_seeds__all__r8"):
        assert (out / "analysis" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"

    # One run's numbers against a dense computation from its adapter file and the base weights.
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phi3lit.hub import resolve_pretrained

    run = out / names[2]  # r=8, seed 0
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.1.self_attn.qkv_proj"
    a, b = tensors[f"{prefix}.lora_A.weight"].double(), tensors[f"{prefix}.lora_B.weight"].double()
    scale = cfg["alpha_pattern"]["qkv_proj"] / cfg["rank_pattern"]["qkv_proj"]
    assert scale == 2.0
    v_rows = slice(2 * 256, 3 * 256)  # tiny Phi-3: q, k, v rows of 256 each; [q, v] puts v in columns 8..15
    delta = scale * b[v_rows, 8:16] @ a[8:16]
    w = load_file(f"{resolve_pretrained('builtin:tiny-phi3')}/model.safetensors")
    w = w["model.layers.1.self_attn.qkv_proj.weight"].double()[v_rows]
    u, s, vh = torch.linalg.svd(delta)
    amplification = float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(u[:, :8].T @ w @ vh[:8].T))
    row = next(
        r for r in csv.DictReader((run / "analysis" / "updates.csv").open()) if r["layer"] == "1" and r["kind"] == "v"
    )
    assert float(row["dW_fro"]) == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-5)
    assert float(row["stable_rank"]) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-5)
    assert float(row["amplification"]) == pytest.approx(amplification, rel=1e-4)
    assert (run / "analysis" / "spectrum.png").exists() and (run / "analysis" / "modules.png").exists()
    images = EventAccumulator(str(run / "tb" / "analysis"))
    images.Reload()
    assert {"analysis/spectrum", "analysis/modules"} <= set(images.Tags()["images"])

    (out / "summary.csv").unlink()
    assert ablate(str(path), summarize=True) == 0  # analysis files in the folders do not disturb it
    assert list(csv.DictReader((out / "summary.csv").open()))[0]["eq_val_loss"] == runs["4/0"]["eq_val_loss"]
