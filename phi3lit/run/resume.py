"""What a resume may change: the new config against the one saved in the checkpoint.

`fit --ckpt_path ...` restores the optimizer (its learning rate, betas and weight decay included), the schedule,
the data position and the RNG streams from the checkpoint. A setting changed on the command line of a resume
therefore falls in one of three kinds:

* it cannot take effect: the restored optimizer and schedule override it (`optimizer.init_args.lr`, ...). Refused.
* it changes what is being trained mid-run: another base model or other data, split, lengths or order
  (`model.pretrained`, `data.train_file`, `data.seed`, ...). Refused.
* it takes effect from the resumed step on: `trainer.max_steps`, logging and checkpoint intervals, ...

Both refusals can be accepted knowingly with `--accept_changes true`; every difference is printed either way,
and the run folder keeps the original `config.yaml` plus one `config-resume-N.yaml` per resume.
"""

from __future__ import annotations

from phi3lit.savedrun import RUN_DEFINING  # the settings a resume may not change: one list, there

NO_EFFECT = {  # key prefixes restored from the checkpoint's optimizer and scheduler state
    "optimizer.": "the optimizer and its settings (lr, betas, weight decay) are restored from the checkpoint",
    "lr_scheduler.": "the schedule and its settings are restored from the checkpoint",
}


def _no_effect(key: str) -> str | None:
    return next((why for prefix, why in NO_EFFECT.items() if key.startswith(prefix)), None)


IGNORED = (  # where the run folder is, and what follows from it: a moved folder resumes without a word
    "ckpt_path", "accept_changes", "config", "__path__", "trainer.default_root_dir", "checkpoint.dirpath",
    "trainer.logger.init_args.run_dir",
)  # fmt: skip


def flat_config(config) -> dict[str, object]:
    """A jsonargparse namespace as {dotted key: value}, values made comparable (lists, classes as strings)."""
    scalar = (int, float, str, bool, type(None))
    out = {}
    for key, value in vars(config.as_flat()).items():
        out[key] = value if isinstance(value, scalar) else str(value)
    return out


def resume_diff(saved: dict, current: dict) -> list[tuple[str, object, object, str]]:
    """[(key, checkpoint value, new value, kind)] for every setting that differs; kind: refused or effective."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith(IGNORED) or key.split(".")[0] in IGNORED:
            continue
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        refused = _no_effect(key) is not None or key.startswith(RUN_DEFINING)
        out.append((key, old, new, "refused" if refused else "effective"))
    return out


def explain(diffs: list[tuple[str, object, object, str]], accepted: bool) -> str:
    lines = ["[phi3lit] this resume changes settings saved in the checkpoint:"]
    for key, old, new, kind in diffs:
        if _no_effect(key):
            why = f"no effect: {_no_effect(key)}"
        elif kind == "refused":
            why = "changes what is being trained mid-run"
        else:
            why = "takes effect from the resumed step"
        lines.append(f"  {key}: checkpoint {old!r}, now {new!r} ({why})")
    if any(kind == "refused" for *_, kind in diffs):
        if accepted:
            lines.append("  accepted with --accept_changes true")
        else:
            lines.append(
                "  Resume with the checkpoint's values (the run folder's config.yaml), start a new run folder, or "
                "pass --accept_changes true to resume anyway"
            )
    return "\n".join(lines)
