"""Files a user points phi3lit at, and folders it writes into, as careless users and hostile files would have them.

Each test drives the CLI (`phi3lit.__main__.main`, as `python -m phi3lit` does) and asserts the one-line outcome
and that nothing else happened: a payload did not run, a damaged file was not used, a link was not followed, a
failed start left the folder as it was.
"""

import os
import subprocess

import pytest
import torch
from helpers import TINY, explain

from phi3lit.__main__ import main


def fit_args(data, root, *extra):
    return [
        "fit", "--config", TINY, "--data.train_file", str(data), "--data.max_length", "128",
        "--trainer.enable_progress_bar", "false", "--samples.prompts", "[]", "--trainer.val_check_interval", "50",
        "--trainer.default_root_dir", str(root), *extra,
    ]  # fmt: skip


class Payload:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and last.ckpt."""
    root = tmp_path_factory.mktemp("finished")
    main(fit_args(small_data, root, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2"))
    return root


def copy_run(run, to):
    subprocess.run(["cp", "-r", str(run), str(to)], check=True)
    (to / "adapter").is_dir() and subprocess.run(["rm", "-r", str(to / "adapter")], check=True)
    return to


def test_a_crafted_pickle_is_refused_by_export_and_fit_and_its_payload_never_runs(small_data, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": Payload(marker)}, evil)
    err = explain(capsys, ["export", "--ckpt", str(evil), "--out", str(tmp_path / "out")])
    assert "refused" in err and "posix.system" in err
    err = explain(capsys, fit_args(small_data, tmp_path / "run", "--ckpt_path", str(evil)))
    assert "refused" in err
    validate = ["validate", "--config", TINY, "--data.train_file", str(small_data)]
    err = explain(capsys, [*validate, "--ckpt_path", str(evil)])
    assert "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()  # the payload never ran


def test_unpickling_cannot_be_switched_back_on(small_data, tmp_path, capsys):
    err = explain(capsys, fit_args(small_data, tmp_path / "run", "--weights_only", "false"))
    assert "phi3lit: config error: weights_only=false: phi3lit loads checkpoints weights-only" in err
    assert not (tmp_path / "run").exists()


def test_a_torch_file_that_is_not_a_checkpoint_is_named(small_data, tmp_path, capsys):
    other, tensor = tmp_path / "weights.pt", tmp_path / "tensor.pt"
    torch.save({"a": torch.ones(2)}, other)
    torch.save(torch.ones(3), tensor)
    for path in (other, tensor):
        err = explain(capsys, ["export", "--ckpt", str(path), "--out", str(tmp_path / "out")])
        assert f"{path}: a torch file, but not a phi3lit (Lightning) checkpoint" in err
        err = explain(capsys, fit_args(small_data, tmp_path / "run", "--ckpt_path", str(path)))
        assert f"{path}: a torch file, but not a phi3lit (Lightning) checkpoint" in err
        assert len(err.strip().splitlines()) == 1


def test_a_checkpoint_without_a_checksum_loads_with_a_notice(finished, tmp_path, caplog):
    older = tmp_path / "older.ckpt"  # as an earlier phi3lit (or another tool) wrote it: no checksum inside
    content = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    del content["phi3lit_sha256"]
    torch.save(content, older)
    main(["export", "--ckpt", str(older), "--out", str(tmp_path / "out")])
    assert f"{older}: no checksum in it (written by another tool or an earlier phi3lit); loaded unverified" in (
        caplog.text
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def flip_bytes_in_a_lora_tensor(path):
    """Flip 64 bytes inside one LoRA tensor's data, as a bad disk or a bad copy would (the zip stays readable)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    name = next(k for k in state if "lora_A" in k)
    raw = state[name].contiguous().view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw)
    assert at > 0, "the tensor's bytes are stored as they are in the zip"
    data[at + 64 : at + 128] = bytes(b ^ 0xFF for b in data[at + 64 : at + 128])
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_naming_the_newest_intact_one(finished, small_data, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    flip_bytes_in_a_lora_tensor(last)
    err = explain(capsys, ["export", "--ckpt", str(last), "--out", str(tmp_path / "out")])
    assert f"{last}: damaged: its content does not match the checksum" in err
    assert not (tmp_path / "out").exists()
    resume = fit_args(small_data, run, "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "2")
    err = explain(capsys, [*resume, "--ckpt_path", "last"])
    intact = run / "checkpoints" / "step=000004.ckpt"
    assert "damaged" in err and f"resume with --ckpt_path {intact}" in err
    main([*resume, "--ckpt_path", str(intact)])  # the user takes the suggestion: it resumes and finishes
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_last_missing_after_a_kill_between_the_two_writes_resumes_from_the_newest_step(finished, small_data, tmp_path,
                                                                                        caplog):  # fmt: skip
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()  # killed after step=000004.ckpt, before last.ckpt
    main(fit_args(small_data, run, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert "resuming from step=000004.ckpt, the newest intact checkpoint there" in caplog.text
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_last_missing_and_the_newest_step_damaged_resumes_from_an_older_intact_one(finished, small_data, tmp_path,
                                                                                      caplog):  # fmt: skip
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()
    flip_bytes_in_a_lora_tensor(run / "checkpoints" / "step=000004.ckpt")
    main(fit_args(small_data, run, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert "resuming from step=000002.ckpt, the newest intact checkpoint there (skipped as damaged: " \
        "step=000004.ckpt)" in caplog.text  # fmt: skip
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_last_missing_and_every_step_damaged_is_refused_not_started_over(finished, small_data, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoints" / "last.ckpt").unlink()
    for step in ("step=000002.ckpt", "step=000004.ckpt"):
        flip_bytes_in_a_lora_tensor(run / "checkpoints" / step)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    err = explain(capsys, fit_args(small_data, run, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert "has no last.ckpt and none of its 2 step checkpoints (step=000004.ckpt, step=000002.ckpt) is intact" in err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing overwritten


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(finished, small_data, tmp_path,
                                                                                       capsys):  # fmt: skip
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run = copy_run(finished, disk / "run")
        last = run / "checkpoints" / "last.ckpt"
        kept = last.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        # Room for the resume's config and events; not for a checkpoint (LoRA + AdamW state, ~1.4 MB).
        (disk / "filler").write_bytes(b"\0" * (free - 600 * 1024))
        args = fit_args(small_data, run, "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "2")
        err = explain(capsys, [*args, "--ckpt_path", "last", "--guard.min_free_mb", "0", "--monitor.plot", "false"])
        line = err.strip().splitlines()[-1]  # above it only the progress of loading the base weights
        assert line.startswith("phi3lit: environment error: ") and "could not write the checkpoint (" in line
        assert "nothing partial was left" in line
        assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
        assert last.read_bytes() == kept  # the previous last.ckpt, whole: it still exports
        main(["export", "--ckpt", str(last), "--out", str(tmp_path / "out")])
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_stale_temporaries_of_killed_runs_are_removed_and_nothing_else(finished, small_data, tmp_path, caplog):
    run = copy_run(finished, tmp_path / "run")
    dead = 2**22 + 12345  # above the default pid_max: no process has it
    stale = [run / "checkpoints" / f"last.ckpt.tmp-{dead}", run / f".adapter.tmp-{dead}"]
    stale[0].write_bytes(b"x" * 1000)
    stale[1].mkdir()
    (stale[1] / "adapter_model.safetensors").write_bytes(b"x")
    kept = [run / "checkpoints" / f"notes.tmp-{dead}", run / f"tmp-{dead}"]  # not names phi3lit writes
    for p in kept:
        p.write_text("mine")
    mine = run / f".venv.tmp-{dead}"  # a hidden folder of the user's, named like a temporary but not phi3lit's
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (run / f".adapter.old-{dead}").symlink_to(elsewhere)  # phi3lit's name, but a link: never followed
    main(fit_args(small_data, run, "--trainer.max_steps", "5", "--ckpt_path", "last"))
    assert not any(p.exists() for p in stale) and all(p.read_text() == "mine" for p in kept)
    assert (mine / "keep.txt").read_text() == "mine" and (elsewhere / "keep.txt").read_text() == "mine"
    assert f"removed what killed runs left mid-write: last.ckpt.tmp-{dead}" in caplog.text


def test_a_fit_that_fails_before_training_leaves_the_folder_as_it_was(small_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no reply: nothing to train on
    explain(capsys, fit_args(bad, tmp_path / "new", "--trainer.max_steps", "2"))
    assert not (tmp_path / "new").exists()  # it did not exist before
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    explain(capsys, fit_args(bad, existing, "--trainer.max_steps", "2"))
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # no lock, tb/ or config.yaml left


def test_a_symlinked_lock_is_refused_and_its_target_untouched(small_data, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".phi3lit.lock").symlink_to(target)
    err = explain(capsys, fit_args(small_data, run, "--trainer.max_steps", "2"))
    assert "is a symbolic link; phi3lit never writes its lock through a link" in err
    assert target.read_text() == "keep me"


def test_a_link_planted_at_a_write_name_is_never_written_through(small_data, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    # The adapter's temporary folder (its name holds this process's pid: fit runs in-process here).
    (run / f".adapter.tmp-{os.getpid()}").symlink_to(elsewhere)
    main(fit_args(small_data, run, "--trainer.max_steps", "2"))
    assert list(elsewhere.iterdir()) == [] and not (run / "adapter").is_symlink()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # Lightning's copy of the config, tb/config.yaml
    target = tmp_path / "precious.yaml"
    target.write_text("keep me")
    other = tmp_path / "other"
    (other / "tb").mkdir(parents=True)
    (other / "tb" / "config.yaml").symlink_to(target)
    err = explain(capsys, fit_args(small_data, other, "--trainer.max_steps", "2"))
    assert "config.yaml: is a symbolic link; phi3lit never writes a config through a link" in err
    assert target.read_text() == "keep me"


def test_printed_commands_survive_a_path_with_spaces(small_data, tmp_path, capsys):
    import shlex

    run = tmp_path / "my run (v2)"
    main(fit_args(small_data, run, "--trainer.max_steps", "2"))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("next"))
    words = shlex.split(line.strip().removeprefix("next"))  # as a shell reads the copied command
    assert words[:4] == ["python", "-m", "phi3lit", "chat"] and words[-1] == str(run / "adapter")
