"""Hostile data files and cache folders (issue 29): a huge example, a shared or full cache folder, files that are not
what their name says. Driven through the CLI, as a user runs it; each failure is one line and exit code 2."""

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, TINY

from phi3lit.__main__ import main
from phi3lit.data.chat import _tokenize_whole, bound_messages, longest_token_chars, tokenize_example


def explain(capsys, args) -> str:
    """`phi3lit ARGS` must stop with one line on stderr, no traceback, exit code 2."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "examples/s]" not in line]
    assert "Traceback" not in err and len(lines) == 1, err  # the message alone, beside any progress bar
    return lines[0]


def data_cmd(train_file, cache, *extra) -> list[str]:
    """`data` on the user's own file, validation held out of it (the default config has its own val_file)."""
    train = ["--data.train_file", str(train_file), "--data.val_file", "null"]
    return ["data", "--config", TINY, *train, "--data.cache_dir", str(cache), *extra]


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


# ---------------------------------------------------------------------------- item 4: one huge example
def _text(rng: random.Random, chars: int, kind: str) -> str:
    words = ["the", "cat", "arithmetic", "Über", "naïve", "12345", "x=y+1;", "\n", "  ", "—", "🙂", "日本語"]
    if kind == "no spaces":  # one run far longer than the bound: the cut falls inside it
        return "".join(rng.choice(["ab", "c", "🙂", "日本", "9"]) for _ in range(chars // 2))[:chars]
    out, n = [], 0
    while n < chars:
        w = rng.choice(words) + rng.choice([" ", " ", "\n", "", "\t"])
        out.append(w)
        n += len(w)
    return "".join(out)


def _conversations(rng: random.Random, long: int) -> list[list[dict]]:
    """Conversations well past any max_length used below, with the long part in each place it can be."""
    short = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    user, reply = ({"role": "user", "content": _text(rng, long, "words")}, {"role": "assistant", "content": "Sure."})
    return [
        [user, reply],  # the prompt alone is far too long: too_long, the reply cut off entirely
        [short[0], {"role": "assistant", "content": _text(rng, long, "words")}],  # cut inside the first reply
        [
            {"role": "system", "content": "Be brief."},
            *short,
            *short,
            short[0],
            {**reply, "content": _text(rng, long, "words")},
        ],
        [*short] * 3 + [{"role": "user", "content": _text(rng, long, "no spaces")}, reply],
        [short[0], {"role": "assistant", "content": _text(rng, long, "no spaces")}],
        # many long messages: the bound is over the whole conversation, not per message
        [m for _ in range(12) for m in ({"role": "user", "content": _text(rng, long // 8, "words")}, reply)],
    ]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_a_cut_example_tokenizes_exactly_as_the_whole_one(which, request):
    tok = request.getfixturevalue(f"{which}_tokenizer")
    rng = random.Random(0)
    cut = 0
    for max_length in (48, 200):
        long = 3 * max_length * longest_token_chars(tok)  # "moderately long": whole tokenization stays quick
        for messages in _conversations(rng, long):
            cut += bound_messages(messages, max_length, longest_token_chars(tok))[1]
            for train_on in ("assistant", "all"):
                for truncation in ("truncate", "drop"):
                    settings = {"max_length": max_length, "train_on": train_on, "truncation": truncation}
                    bounded = tokenize_example(messages, tok, **settings)
                    whole = _tokenize_whole(messages, tok, **settings)
                    assert bounded.outcome == whole.outcome
                    assert bounded.example == whole.example  # the same ids and labels, to the last token
                    assert bounded.full_length > max_length
    assert cut == 12  # every conversation was cut (else this compared nothing)


def test_a_huge_example_takes_bounded_memory(tmp_path):
    """A 30 MB example (two 15 MB messages) once took 18 GB and was OOM-killed; now `data` reads it in well under
    2 GB. The process gets a 3 GB data limit, so a regression fails here instead of taking the machine's memory."""
    big = [
        {"role": "user", "content": "Summarise: " + "word " * 3_000_000},
        {"role": "assistant", "content": "ok " * 5_000_000},
    ]
    small = [
        [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}."}]
        for i in range(20)
    ]
    data = write_jsonl(tmp_path / "big.jsonl", [big, *small])
    assert data.stat().st_size > 25_000_000
    measure = (
        "import resource, subprocess, sys\n"
        "limit = lambda: resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))\n"
        "r = subprocess.run(sys.argv[1:], preexec_fn=limit, capture_output=True, text=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
        "print(r.stdout[-3000:], r.stderr[-3000:])\n"
    )
    cmd = [sys.executable, "-m", "phi3lit", *data_cmd(data, tmp_path / "cache", "--data.val_fraction", "0")]
    out = subprocess.run([sys.executable, "-c", measure, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    peak_kb, rc = map(int, out.stdout.split("\n", 1)[0].split())
    assert rc == 0, out.stdout
    assert peak_kb < 2 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MiB"
    # The huge one is left out (its prompt alone is far over max_length): counted, as for any too-long example.
    assert "examples       21" in out.stdout and "kept           20 conversations" in out.stdout
    assert "too_long 1" in out.stdout


# ---------------------------------------------------------------------------- item 5: a shared cache folder
def test_the_cache_clean_up_removes_only_its_own_files(tmp_path, tmp_path_factory, capsys, small_data):
    cache = tmp_path / "cache"  # as if --data.cache_dir /tmp: other programs' temporary files live there too
    cache.mkdir()
    hour_ago = time.time() - 3600
    foreign_file, foreign_dir = cache / "tmpabc123", cache / "tmp_build"
    foreign_file.write_bytes(b"someone else's")
    foreign_dir.mkdir()
    (foreign_dir / "inside").write_bytes(b"x")
    victim = tmp_path / "victim"
    victim.write_bytes(b"not phi3lit's")
    host = socket.gethostname()
    link = cache / f"phi3lit-tmp-{host}-999999999-x.arrow"  # our name, but a link: neither it nor its target goes
    link.symlink_to(victim)
    ours = cache / f"phi3lit-tmp-{host}-999999999-y.arrow"  # ours, of a pid above Linux's pid_max: removed
    ours.write_bytes(b"partial")
    for p in (foreign_file, foreign_dir, victim, ours):
        os.utime(p, (hour_ago, hour_ago))
    os.utime(link, (hour_ago, hour_ago), follow_symlinks=False)
    main(data_cmd(small_data, cache))
    assert "kept           57 conversations" in capsys.readouterr().out
    assert foreign_file.read_bytes() == b"someone else's" and (foreign_dir / "inside").exists()
    assert link.is_symlink() and victim.read_bytes() == b"not phi3lit's"
    assert not ours.exists()


# ---------------------------------------------------------------------------- item 7: a full cache folder
def test_a_full_cache_folder_is_one_line_and_leaves_nothing(tmp_path, capsys):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:  # the shipped tiny chats tokenize to about 700 kB: far over 64 kB
        err = explain(capsys, ["data", "--config", TINY, "--data.cache_dir", str(disk)])
        assert f"phi3lit: environment error: --data.cache_dir {disk}: cannot write the tokenized data there" in err
        assert "No space left on device" in err and "nothing was left there" in err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # even while a failed run holds a file open


# ---------------------------------------------------------------------------- item 9: files that are not data
def _deep(path, suffix):
    nested = "[" * 100_000 + "]" * 100_000
    if suffix == ".jsonl":
        path.write_text(
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n'
            f'{{"messages": {nested}}}\n'
        )
        return f"{path}:2: JSON nested too deeply to read"
    path.write_text(f"[{nested}]")
    return f"{path}: JSON nested too deeply to read"


def _open_for_writing(path):
    with contextlib.suppress(OSError):  # no reader (the test is over): nothing to unblock
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("case", ["deep.jsonl", "deep.json", "parquet", "folder", "fifo"])
def test_a_file_that_is_not_data_is_one_line(tmp_path, capsys, case):
    path = tmp_path / (
        "d" + os.path.splitext(case)[1] if case.startswith("deep") else "d.parquet" if case == "parquet" else "d.jsonl"
    )
    if case.startswith("deep"):
        expected = _deep(path, path.suffix)
    elif case == "parquet":
        path.write_text('{"messages": []}\n')  # JSON under a .parquet name
        expected = f"{path}: not a readable Parquet file ("
    elif case == "folder":
        path.mkdir()
        expected = f"{path}: is a folder, not a data file; name a .jsonl, .json or .parquet file in it"
    else:
        os.mkfifo(path)
        expected = f"{path}: is a named pipe (FIFO), not a data file"
    # Nothing writes to the pipe: a reader would wait forever. Should one ever open it, end its wait after 60 s.
    unblock = threading.Timer(60, _open_for_writing, [path])
    unblock.start()
    try:
        err = explain(capsys, data_cmd(path, tmp_path / "cache"))
    finally:
        unblock.cancel()
    assert f"phi3lit: data error: {expected}" in err


def test_links_to_data_are_followed_for_reading(tmp_path, capsys, small_data):
    link = tmp_path / "mine.jsonl"  # the user's own link to their file: reading through it is fine
    link.symlink_to(small_data)
    main(data_cmd(link, tmp_path / "cache"))
    assert "kept           57 conversations" in capsys.readouterr().out
    folder = tmp_path / "folder.jsonl"
    folder.symlink_to(tmp_path, target_is_directory=True)
    assert f"{folder}: is a folder, not a data file" in explain(capsys, data_cmd(folder, tmp_path / "cache"))
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "moved-away.jsonl")
    err = explain(capsys, data_cmd(dangling, tmp_path / "cache"))
    assert f"{dangling}: no such data file (a symbolic link to a missing file)" in err


# ---------------------------------------------------------------------------- issue 25 item 6: data = fit's check
def test_data_refuses_what_fit_refuses_with_the_same_message(tmp_path, capsys):
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(10)]  # no reply: nothing to train
    data = write_jsonl(tmp_path / "d.jsonl", prompts)
    err = explain(capsys, data_cmd(data, tmp_path / "cache"))
    assert f"phi3lit: data error: {data}: nothing to train on: 10 examples, 1 held out for validation" in err
    fit = ["fit", *data_cmd(data, tmp_path / "cache")[1:], "--trainer.default_root_dir", str(tmp_path / "run")]
    assert explain(capsys, fit) == err
