"""phi3lit.files: every output is written whole or not at all, and never through a link someone planted."""

import os

import pytest

from phi3lit.files import atomic_file, atomic_folder, write_text_atomic


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_a_link_at_the_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "summary.csv"
    path.symlink_to(victim)
    write_text_atomic(path, "a,b\n")
    assert victim.read_text() == "precious" and not path.is_symlink() and path.read_text() == "a,b\n"


def test_a_link_at_the_temporary_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "last.ckpt"
    (tmp_path / f"last.ckpt.tmp-{os.getpid()}").symlink_to(victim)
    write_text_atomic(path, "new")  # our own pid's temporary name: removed (as a link), then created new
    assert victim.read_text() == "precious" and path.read_text() == "new"


def test_a_folder_is_swapped_in_whole_or_left_as_it_was(tmp_path):
    out = tmp_path / "adapter"
    with atomic_folder(out) as stage:
        (stage / "adapter_config.json").write_text("{}")
    with pytest.raises(OSError), atomic_folder(out) as stage:
        (stage / "adapter_model.safetensors").write_bytes(b"\0" * 8)
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no stage left behind
    with atomic_folder(out) as stage:
        (stage / "new").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_keep_existing_lets_the_first_of_concurrent_builders_win(tmp_path):
    out = tmp_path / "tiny-phi3"
    with atomic_folder(out, keep_existing=True) as stage:
        (stage / "config.json").write_text("first")
    with atomic_folder(out, keep_existing=True) as stage:
        (stage / "config.json").write_text("second")
    assert (out / "config.json").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-phi3"]
