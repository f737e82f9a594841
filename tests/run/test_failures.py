"""Failure modes: kills and preemption, bad checkpoints, non-finite training, environment and config errors.

Every case asserts the message a user sees, the exit code, and that no good checkpoint was overwritten.
Kills and signals are real: subprocesses and os.kill.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, explain

from phi3lit.__main__ import main
from phi3lit.checkpoint import atomic_torch_save

TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = 12


def fit_cmd(data, root, *extra):
    return [
        sys.executable, "-m", "phi3lit", "fit", "--config", TINY, "--data.train_file", str(data),
        "--data.max_length", "128", "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "4",
        "--checkpoint.every_n_train_steps", "1", "--samples.prompts", "[]", "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(STEPS), *extra,
    ]  # fmt: skip


def weights(root):
    return torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    main(fit_cmd(small_data, root)[3:])
    return weights(root)


def wait_for(predicate, timeout=120.0, poll=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


# ---------------------------------------------------------------------------- kills and preemption
@pytest.mark.parametrize("kill_after", ["step=000002", "step=000007", "tmp"], ids=["early", "late", "mid-write"])
def test_sigkill_then_resume_gives_uninterrupted_weights(small_data, reference, tmp_path, kill_after):
    ckpts = tmp_path / "checkpoints"
    proc = subprocess.Popen(fit_cmd(small_data, tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after == "tmp":  # a checkpoint write in flight: its temporary file exists
        seen = wait_for(lambda: any(".tmp-" in p.name for p in ckpts.glob("*")) if ckpts.exists() else False)
    else:
        seen = wait_for(lambda: (ckpts / f"{kill_after}.ckpt").exists())
    assert seen and proc.poll() is None, "the run ended before the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for ckpt in ckpts.glob("*.ckpt"):  # nothing partial stands under a checkpoint name
        torch.load(ckpt, weights_only=False)
    main(fit_cmd(small_data, tmp_path, "--ckpt_path", "last")[3:])  # the resume (in this process)
    assert_same_weights(weights(tmp_path), reference)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_exits_cleanly(small_data, tmp_path, sig):
    # A long run, so a busy machine cannot let it finish before the signal lands; that the saved checkpoint
    # resumes exactly is what the SIGKILL tests check (same last.ckpt path and contents).
    cmd = fit_cmd(small_data, tmp_path)[:-2] + ["--trainer.max_steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert wait_for(lambda: (tmp_path / "checkpoints" / "step=000003.ckpt").exists())
    os.kill(proc.pid, getattr(signal, sig))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert f"{sig}: saved" in out.decode()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert 3 <= ckpt["global_step"] < 100000
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the data position, for an exact resume
    assert not (tmp_path / "adapter").exists()  # an unfinished run exports nothing


def test_ctrl_c_saves_prints_the_resume_command_and_it_resumes_exactly(small_data, reference, tmp_path):
    proc = subprocess.Popen(fit_cmd(small_data, tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert wait_for(lambda: (tmp_path / "checkpoints" / "step=000002.ckpt").exists())
    os.kill(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    assert "SIGINT: saved" in out
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 2 <= step < STEPS
    # The printed command's words, as a shell splits them, finish the same run.
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("python -m phi3lit fit"))
    assert command.endswith("--ckpt_path last")
    main(shlex.split(command)[3:])
    assert_same_weights(weights(tmp_path), reference)


def test_final_step_is_checkpointed_when_not_a_multiple_of_the_interval(small_data, tmp_path):
    from safetensors.torch import load_file

    main(fit_cmd(small_data, tmp_path, "--checkpoint.every_n_train_steps", "5", "--trainer.max_steps", "7")[3:])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 7
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora = {k.removeprefix("model.base_model.model."): v for k, v in ckpt["state_dict"].items()}
    for key, value in adapter.items():  # the adapter and last.ckpt hold the same, final weights
        match = [v for k, v in lora.items() if k.replace(".default", "") == key.removeprefix("base_model.model.")]
        assert len(match) == 1 and torch.equal(match[0], value), key


def test_second_fit_in_a_busy_run_folder_is_refused_and_a_dead_holder_is_taken_over(small_data, tmp_path, capsys):
    cmd = fit_cmd(small_data, tmp_path)[:-2] + ["--trainer.max_steps", "100000"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (tmp_path / "checkpoints" / "step=000002.ckpt").exists())
        err = explain(capsys, fit_cmd(small_data, tmp_path, "--ckpt_path", "last")[3:])  # a second fit, here
        assert f"is in use by a running fit (pid {first.pid} on " in err
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    names = {p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert not any(n.startswith("last-v") for n in names)
    # The killed holder's lock is released by the kernel: a resume takes the folder over.
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    main(fit_cmd(small_data, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", str(step + 2))[3:])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 2


def test_fresh_fit_into_a_folder_with_an_earlier_run_is_refused(small_data, tmp_path, capsys):
    main(fit_cmd(small_data, tmp_path, "--trainer.max_steps", "2")[3:])
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(fit_cmd(small_data, tmp_path, "--trainer.max_steps", "2")[3:])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of an earlier run" in err and "--ckpt_path last" in err
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before


def test_full_disk_during_the_final_adapter_save(small_data, tmp_path, capsys):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:  # the adapter (about 460 kB) is written to a 128 kB disk; the checkpoints go to the roomy run folder
        adapter = ["--adapter.dirname", str(disk / "adapter")]
        err = explain(capsys, fit_cmd(small_data, tmp_path / "run", "--trainer.max_steps", "2", *adapter)[3:])
        assert "could not write the adapter (" in err and "No space left on device" in err
        assert "nothing partial was left there" in err
        assert list(disk.iterdir()) == []  # no 0-byte README, no temporary folder
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["global_step"] == 2  # the final weights are safe, and the message says how to export them
        assert f"python -m phi3lit export --ckpt {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in err
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_killed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    code = (
        "import torch, sys; from phi3lit.checkpoint import atomic_torch_save; "
        "atomic_torch_save({'big': torch.ones(150_000_000)}, sys.argv[1])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT)
    assert wait_for(lambda: any(".tmp-" in p.name for p in tmp_path.iterdir()), poll=0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(target, weights_only=True)
    assert saved.pop("phi3lit_sha256") and saved == {"step": 1}  # the previous file, its checksum beside its content


def test_fit_writes_its_checkpoints_through_the_atomic_io(small_data, tmp_path):
    from probes import probe_arg, read_probe

    out = tmp_path / "facts.jsonl"
    main([*fit_cmd(small_data, tmp_path / "run", *probe_arg("TrainerFacts", out))[3:], "--trainer.max_steps", "1"])
    assert read_probe(out) == [{"checkpoint_io": "phi3lit.checkpoint.AtomicCheckpointIO"}]


# ---------------------------------------------------------------------------- bad checkpoints
def test_truncated_checkpoint_is_named(small_data, tmp_path, capsys, reference):
    bad = tmp_path / "bad.ckpt"
    good = ROOT / "phi3lit" / "assets" / "tiny_chat.jsonl"
    bad.write_bytes(good.read_bytes()[:1000])
    args = fit_cmd(small_data, tmp_path / "run", "--ckpt_path", str(bad))[3:]
    err = explain(capsys, args)
    assert f"phi3lit: checkpoint error: {bad}: not a readable checkpoint" in err


def test_lora_mismatch_lists_the_difference(small_data, tmp_path, capsys):
    main(fit_cmd(small_data, tmp_path, "--trainer.max_steps", "2")[3:])
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    args = fit_cmd(small_data, tmp_path, "--ckpt_path", "last", "--model.lora.r", "8")[3:]
    err = explain(capsys, args)
    assert "phi3lit: checkpoint error: this resume changes settings saved in the checkpoint" in err
    assert "model.lora.r: checkpoint 16, now 8 (changes what is being trained mid-run)" in err
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before


# ---------------------------------------------------------------------------- non-finite training
def test_nonfinite_step_is_never_applied_and_stops_the_run(small_data, tmp_path, capsys):
    args = fit_cmd(small_data, tmp_path, "--optimizer.lr", "1e30", "--trainer.gradient_clip_val", "null")[3:]
    err = explain(capsys, args, code=3)
    assert "phi3lit: training error: non-finite loss" in err and "at optimizer step" in err
    assert f"the step's examples: {small_data}:" in err  # file:line of the conversations in the bad step
    step = int(err.split("at optimizer step ")[1].split(";")[0].split(".")[0].split()[0])
    assert step >= 1  # the first step is finite; its 1e30 learning rate breaks the next one
    ckpts = {int(p.stem.split("=")[1]): p for p in (tmp_path / "checkpoints").glob("step=*.ckpt")}
    states = {k: torch.load(p, weights_only=False)["state_dict"] for k, p in ckpts.items()}
    assert all(torch.isfinite(v).all() for state in states.values() for v in state.values())
    # Skipped on the device: the checkpoint written after the bad step equals the one before it.
    before, after = states[step], states[step + 1]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "adapter").exists()


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(small_data, tmp_path, capsys, caplog):
    """skip: the first two bad steps are skipped (each logged) and training goes on; the third stops the run."""
    extra = ["--optimizer.lr", "1e30", "--trainer.gradient_clip_val", "null", "--model.on_nonfinite", "skip"]
    extra += ["--trainer.log_every_n_steps", "1"]  # check every step, so each bad step is seen as it happens
    err = explain(capsys, fit_cmd(small_data, tmp_path, *extra, "--model.max_skipped_steps", "2")[3:], code=3)
    skipped = [int(line.split("skipped step ")[1].split(":")[0]) for line in caplog.messages if "skipped step" in line]
    stopped = int(err.split("at optimizer step ")[1].split(";")[0].split(".")[0].split()[0])
    assert len(skipped) == 2 and skipped == sorted(skipped) and stopped > skipped[-1]
    assert err.count("non-finite") == 1


# ---------------------------------------------------------------------------- environment
def test_unwritable_output_folder(small_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = explain(capsys, fit_cmd(small_data, blocker / "run")[3:])
    assert f"trainer.default_root_dir='{blocker / 'run'}' is not writable" in err


def test_not_enough_free_space(small_data, tmp_path, capsys):
    err = explain(capsys, fit_cmd(small_data, tmp_path, "--guard.min_free_mb", str(10**12))[3:])
    assert "MiB free, less than guard.min_free_mb=1000000000000" in err


@pytest.mark.parametrize("name", ["/no/such/model", "microsoft/Phi-3-mini-4k-instruct"], ids=["path", "hub-offline"])
def test_missing_model_says_how_to_point_to_weights(small_data, tmp_path, capsys, name):
    err = explain(capsys, fit_cmd(small_data, tmp_path, "--model.pretrained", name)[3:])
    assert f"model.pretrained='{name}': cannot load it" in err and "set model.pretrained=DIR" in err


def test_flash_attention_needs_a_gpu(small_data, tmp_path, capsys):
    err = explain(capsys, fit_cmd(small_data, tmp_path, "--model.attn_implementation", "flash_attention_2")[3:])
    assert "flash_attention_2 is GPU-only" in err


def test_deepspeed_strategy_names_the_extra(small_data, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    fragment = str(ROOT / "configs" / "strategy" / "deepspeed_zero2.yaml")
    err = explain(capsys, fit_cmd(small_data, tmp_path, "--config", fragment)[3:])
    assert "DeepSpeed, which is not installed: pip install 'phi3lit[deepspeed]'" in err


def test_fp8_precision_needs_a_gpu(small_data, tmp_path, capsys):
    err = explain(capsys, fit_cmd(small_data, tmp_path, "--trainer.precision", "transformer-engine")[3:])
    assert "trainer.precision=transformer-engine (FP8) is GPU-only" in err


# ---------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.lora.r", "0"], "model.lora.r must be positive, got 0"),
        (["--model.lora.dropout", "1.5"], "model.lora.dropout must be in [0, 1), got 1.5"),
        (["--model.lora.targets", "[q, qq]"], "model.lora.targets: unknown target 'qq'"),
        (["--data.max_length", "5000"], "data.max_length=5000 exceeds the model's 1024 positions"),
        (["--data.batch_size", "0"], "data.batch_size must be at least 1, got 0"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be at least 1, got 0"),
        (["--optimizer.lr=-1e-3"], "optimizer.init_args.lr must be a finite number >= 0, got -0.001"),
        (["--optimizer.lr", ".nan"], "optimizer.init_args.lr must be a finite number >= 0, got nan"),  # YAML's NaN
        (["--optimizer.lr", ".inf"], "optimizer.init_args.lr must be a finite number >= 0, got inf"),
        (["--trainer.max_steps", "0"], "trainer.max_steps=0 trains nothing"),
        (["--data.val_fraction", "0.999", "--data.val_file", "null"], "data.val_fraction=0.999 holds out more"),
        (["--model.lora.r", "100000"], "model.lora.r=100000 is above min(in, out)=256 of qkv_proj (256, 256)"),
        (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps must be at least 1, got 0"),
        (["--checkpoint.every_n_train_steps", "-1"], "checkpoint.every_n_train_steps must be >= 0"),
        (["--data.num_workers", "-3"], "data.num_workers must be >= 0"),
        (["--data.val_batch_size", "0"], "data.val_batch_size must be at least 1 (null: batch_size), got 0"),
        # A value the parser itself refuses: its message in one line, not 120 lines of usage.
        (
            ["--model.lora.dropout", "nan"],
            "Parser key \"model.lora.dropout\": Expected a <class 'float'>. Got value: nan",
        ),
    ],
    ids=[
        "rank",
        "dropout",
        "target",
        "max_length",
        "batch_size",
        "accumulate",
        "lr",
        "lr_nan",
        "lr_inf",
        "max_steps",
        "val_fraction",
        "huge_rank",
        "log_every_0",
        "every_n_negative",
        "workers_negative",
        "val_batch_size",
        "dropout_nan_parse",
    ],
)
def test_impossible_config_values_fail_before_loading(small_data, tmp_path, capsys, extra, message):
    err = explain(capsys, fit_cmd(small_data, tmp_path, *extra)[3:])
    assert f"phi3lit: config error: {message}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


def test_bad_data_file_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    err = explain(capsys, fit_cmd(bad, tmp_path / "run")[3:])
    assert f"phi3lit: data error: {bad}:2: not valid JSON" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_without_chat_tokens_fails_before_loading(small_data, tmp_path, capsys, tiny_path):
    import shutil

    plain = tmp_path / "plain-model"
    shutil.copytree(tiny_path, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = plain / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    err = explain(capsys, fit_cmd(small_data, tmp_path / "run", "--model.pretrained", str(plain))[3:])
    assert "phi3lit: config error: data.train_on=assistant needs a tokenizer with Phi-3's chat tokens" in err


def test_data_command_shows_stats_and_a_marked_example(capsys):
    main(["data", "--config", TINY])
    out = capsys.readouterr().out
    assert "examples       2,000" in out and "packing" in out and "[[" in out and "<|end|>]]" in out


@pytest.mark.parametrize("fragment", ["fsdp.yaml", "deepspeed_zero3.yaml"])
def test_sharded_strategies_refuse_what_cannot_be_verified_without_gpus(small_data, tmp_path, capsys, fragment):
    import importlib.util

    if "deepspeed" in fragment and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the DeepSpeed check names the missing extra first (test_deepspeed_strategy_names_the_extra)")
    strategy = ["--config", str(ROOT / "configs" / "strategy" / fragment)]
    err = explain(capsys, fit_cmd(small_data, tmp_path, *strategy, "--model.lora.targets", "[q, v]")[3:])
    assert "adapts slices of qkv_proj" in err and "bypass" in err
    err = explain(capsys, fit_cmd(small_data, tmp_path, *strategy, "--samples.prompts", "[Hi]")[3:])
    assert "samples.prompts: sample replies are generated on rank 0 alone, which would deadlock" in err


def test_an_oversized_rank_trains_when_forced(small_data, tmp_path):
    """`model.lora.force_rank=true` is the knowing way past the rank check: the run trains at that rank."""
    extra = ["--model.lora.r", "300", "--model.lora.force_rank", "true", "--trainer.max_steps", "1"]
    main(fit_cmd(small_data, tmp_path, *extra)[3:])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {300}
