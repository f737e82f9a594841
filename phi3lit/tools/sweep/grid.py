"""What a sweep is: a sweep file, the grid points it expands to, their folders and their `fit` commands.

A sweep file names a base config, a grid of CLI overrides, optional fixed overrides and optional seeds:

    base: configs/tiny.yaml
    grid:
      model.lora.r: [4, 8, 16]
      model.lora.targets: [[q, v], attn, all-linear]
    fixed: {trainer.max_steps: 100}
    seeds: [0, 1]
    eval: [phi3lit_demo]    # optional: lm-eval tasks scored on each point's adapter after its fit
                            # ({tasks: [...], limit: N} scores the first N documents of each)

`load_sweep` checks it (anything wrong is a one-line ConfigError naming the file) and `points` expands it into
grid x seeds, in a stable order. A point is named after its grid values by the last part of each key
(`r=8__targets=q+v__seed=1`); that name is its run folder `<root>/<sweep>/<point name>/`. Sweep and value names
become safe folder names (`safe_name`: no separators, no `..`, no leading dot, bounded; a short hash of the raw
value when anything changed, so distinct values keep distinct folders). A `data.batch_size` sweep gives every
point one `data.val_batch_size` (`common_val_batch`), so all score the same validation rows. Its command is
`python -m phi3lit fit --config <base> --trainer.default_root_dir <folder> --<key> <value> ...` (`fit_args`;
`dry_run` prints it as a user would type it). The folder holds what fit and ablate leave there: the resolved
`config.yaml` (`phi3lit.savedrun.SavedRun`) and ablate's `status.json` (`read_status` / `write_status`).

`model.lora.alpha` may be a rule rather than a number (`alpha_rule`): a number (fixed alpha, scale alpha/r),
`2r` (alpha = 2*r, a constant scale 2) or `rslora` / `rslora:16` (use_rslora, scale alpha/sqrt(r)).
`apply_alpha_rule` turns it into the number (and `use_rslora`) fit gets, from the point's r; `effective_scale`
is what then multiplies B A.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import re
import shlex
from pathlib import Path

import yaml

from phi3lit.errors import ConfigError, EnvironmentProblem
from phi3lit.files import write_text_atomic
from phi3lit.savedrun import SavedRun
from phi3lit.tools.sweep.stats import number

ALPHA_KEY, RSLORA_KEY, RANK_KEY = "model.lora.alpha", "model.lora.use_rslora", "model.lora.r"
BATCH_KEY, VAL_BATCH_KEY = "data.batch_size", "data.val_batch_size"
LORA_DEFAULTS = {RANK_KEY: 16, ALPHA_KEY: 32.0, RSLORA_KEY: False}  # phi3lit.model.lora.LoraSpec's defaults
SWEEP_KEYS = {"base", "grid", "fixed", "seeds", "name", "root", "eval"}


# ---------------------------------------------------------------------------- the sweep file
def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep file; anything wrong is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror or e})") from None
    try:
        sweep = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    need = "a sweep needs `base:` (a config file) and `grid:` (key: [values, ...])"
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: {need}; the file holds no mapping")
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:  # a typo such as `seed:` would otherwise be silently ignored
        known = ", ".join(sorted(SWEEP_KEYS))
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; a sweep has {known}")
    missing = [k for k in ("base", "grid") if sweep.get(k) is None]
    if missing:
        raise ConfigError(f"{path}: no `{'` or `'.join(missing)}:`; {need}")
    base = Path(str(sweep["base"]))
    if not base.is_file():  # fit would fail the same way at every point
        where = "" if base.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise ConfigError(f"{path}: base: {base} does not exist{where}")
    grid = sweep["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid: must map config keys to lists of values, e.g. `model.lora.r: [4, 8]`")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{path}: grid: {key}: must be a non-empty list of values, got {values!r} "
                "(a single value belongs in `fixed:`; a list value is written [[q, v]])"
            )
    shorts = [short(str(k)) for k in grid]
    clash = sorted({s for s in shorts if shorts.count(s) > 1})
    if clash:  # point names and summary columns use the last part of the key
        raise ConfigError(f"{path}: grid: keys ending in the same name ({', '.join(clash)}) cannot be told apart")
    fixed = sweep.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: fixed: must map config keys to values, got {fixed!r}")
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ConfigError(f"{path}: {', '.join(both)} in both `grid:` and `fixed:`; keep one")
    rules = [alpha_rule(v, path) for v in grid.get(ALPHA_KEY, [])]
    rules += [alpha_rule(fixed[ALPHA_KEY], path)] if ALPHA_KEY in fixed else []
    if any(kind == "rslora" for kind, _ in rules) and (RSLORA_KEY in grid or RSLORA_KEY in fixed):
        raise ConfigError(f"{path}: {ALPHA_KEY}: rslora sets {RSLORA_KEY}; do not also set {RSLORA_KEY}")
    seeds = sweep.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise ConfigError(f"{path}: seeds: must be a non-empty list, e.g. [0, 1], got {seeds!r}")
    spec = sweep.get("eval") or []
    spec = spec if isinstance(spec, dict) else {"tasks": spec}
    tasks, limit = spec.get("tasks"), spec.get("limit")
    if set(spec) - {"tasks", "limit"} or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"{path}: eval: must be a list of lm-eval task names, e.g. [phi3lit_demo], or "
                          f"{{tasks: [...], limit: N}}; got {sweep.get('eval')!r}")  # fmt: skip
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{path}: eval: limit: must be a positive number of documents, got {limit!r}")
    sweep["eval"] = {"tasks": tasks, "limit": limit} if tasks else None
    sweep["fixed"] = fixed
    sweep["seeds"] = seeds or [None]
    sweep["name"] = safe_name(str(sweep.get("name") or path.stem))  # `name: ../../x` stays under the root
    sweep["root"] = str(sweep.get("root") or "runs/sweeps")
    names = [p["name"] for p in points(sweep)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # two points would share one run folder
        raise ConfigError(f"{path}: points with the same name (and folder): {', '.join(dup)}")
    return sweep


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def readable(value, key: str = "") -> str:
    if key == ALPHA_KEY:  # a rule by its short name: 32, 2r, rslora, rslora16 (no `*` or `:` in folder names)
        kind, x = alpha_rule(value)
        if kind == "per_r":
            return f"{x:g}r"
        if kind == "rslora":
            return "rslora" if x is None else f"rslora{x:g}"
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return str(value)


# ---------------------------------------------------------------------------- alpha rules and the update scale
ALPHA_RULES = "a number (fixed alpha: scale alpha/r), `<k>r` such as 2r (alpha = k*r: scale k), `rslora[:<alpha>]`"


def alpha_rule(value, where: str | Path = "") -> tuple[str, float | None]:
    """`model.lora.alpha` in a sweep: ("fixed", alpha), ("per_r", k) for `2r` / `2*r`, ("rslora", alpha or None)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return "fixed", float(value)
    text = str(value).replace(" ", "").lower()
    if (m := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\*?r", text)) and float(m.group(1)) > 0:
        return "per_r", float(m.group(1))
    m = re.fullmatch(r"rslora(?::(\d+(?:\.\d*)?|\.\d+))?", text)
    if m and (m.group(1) is None or float(m.group(1)) > 0):
        return "rslora", None if m.group(1) is None else float(m.group(1))
    if re.fullmatch(r"\d+(?:\.\d*)?(?:e[-+]?\d+)?", text) and float(text) > 0:
        return "fixed", float(text)
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}{ALPHA_KEY}: {value!r} is not an alpha rule; use {ALPHA_RULES}")


def base_value(sweep: dict, key: str):
    """A dotted key's value in the sweep's base config, else phi3lit's default (None when neither has it)."""
    try:
        cfg = yaml.safe_load(Path(sweep["base"]).read_text())
    except (OSError, yaml.YAMLError):
        cfg = None
    base = SavedRun(Path(sweep["base"]).parent, cfg if isinstance(cfg, dict) else {})  # a config, read the same way
    return base.get(key, LORA_DEFAULTS.get(key))


def apply_alpha_rule(sweep: dict, overrides: dict) -> dict:
    """The fit overrides for a point: an alpha rule becomes a number (and use_rslora), computed from the point's r."""
    if ALPHA_KEY not in overrides:
        return overrides
    out = dict(overrides)
    kind, x = alpha_rule(out[ALPHA_KEY])
    if kind == "fixed":
        out[ALPHA_KEY] = out[ALPHA_KEY] if isinstance(out[ALPHA_KEY], int | float) else x  # as written
    elif kind == "per_r":
        r = out.get(RANK_KEY, base_value(sweep, RANK_KEY))
        if number(r) is None:
            raise ConfigError(f"{ALPHA_KEY}: {out[ALPHA_KEY]!r} needs a numeric {RANK_KEY}, got {r!r}")
        alpha = round(x * float(r), 10)
        out[ALPHA_KEY] = int(alpha) if alpha.is_integer() else alpha
    else:
        out[RSLORA_KEY] = True
        if x is None:
            del out[ALPHA_KEY]
        else:
            out[ALPHA_KEY] = int(x) if x.is_integer() else x
    return out


def effective_scale(r, alpha, rslora) -> float | None:
    """What multiplies B A: alpha / r, or alpha / sqrt(r) with rsLoRA (per slice for sliced targets)."""
    r, alpha = number(r), number(alpha)
    if not r or alpha is None:
        return None
    return alpha / (math.sqrt(r) if rslora in (True, "true", "True") else r)


# ---------------------------------------------------------------------------- points and their fit commands
def points(sweep: dict) -> list[dict]:
    """Grid x seeds, in a stable order: [{"name", "overrides", "values", "seed"}]."""
    keys = list(sweep["grid"])
    val_batch = common_val_batch(sweep)
    out = []
    for combo in itertools.product(*(sweep["grid"][k] for k in keys)):
        for seed in sweep["seeds"]:
            values = dict(zip(keys, combo, strict=True))
            name = "__".join(f"{safe_name(short(k))}={safe_name(readable(v, k))}" for k, v in values.items())
            if seed is not None:
                name += f"__seed={safe_name(str(seed))}"
            overrides = apply_alpha_rule(sweep, {**sweep["fixed"], **values})
            if val_batch is not None:
                overrides[VAL_BATCH_KEY] = val_batch
            out.append({"name": name, "values": values, "seed": seed, "overrides": overrides})
    return out


NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=,@-]")  # what a folder name keeps as written; the rest becomes `_`
NAME_LIMIT = 64  # characters kept of one value's name: a point's folder name stays far below 255 bytes


def safe_name(raw: str) -> str:
    """`raw` as one folder name: no separators, no `..`, no leading dot, at most NAME_LIMIT characters (+ a hash).

    When anything had to change, a short hash of the raw text is appended, so two values that sanitise alike
    (`a/b`, `a:b`) still get two folders; names that are already safe (`r=8`, `targets=q+v`) stay as they are."""
    name = NAME_CHARS.sub("_", raw)
    name = re.sub(r"\.{2,}", "_", name).lstrip(".") or "_"
    if name == raw and len(name) <= NAME_LIMIT:
        return name
    return f"{name[:NAME_LIMIT]}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def common_val_batch(sweep: dict) -> int | None:
    """The validation batch size every point of a `data.batch_size` sweep gets: the grid's smallest batch size.

    Validation rows are packed in a seeded order and scored in batches; `limit_val_batches: N` scores the first
    N x batch rows. One validation batch size for every point makes every point score the same rows, batched the
    same way (the smallest always fits: validation keeps no activations for backward). None when batch_size is
    not swept or the sweep sets data.val_batch_size itself."""
    sizes = [number(b) for b in sweep["grid"].get(BATCH_KEY, [])]
    if len(set(sizes)) < 2 or None in sizes or VAL_BATCH_KEY in sweep["grid"] or VAL_BATCH_KEY in sweep["fixed"]:
        return None
    return int(min(sizes))


def cli_value(value) -> str:
    """A CLI string for a YAML value: lists in flow style, everything else as YAML would print it."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def eval_args(sweep: dict, point: dict) -> list[str]:
    """The point's `eval` command (after its fit): the sweep's tasks on the point's adapter; the scores go to the
    point's TensorBoard, where the summary reads them."""
    spec = sweep["eval"]
    limit = ["--limit", str(spec["limit"])] if spec["limit"] else []
    return ["eval", "--adapter", str(point_dir(sweep, point) / "adapter"), "--tasks", cli_value(spec["tasks"]), *limit]


def fit_args(sweep: dict, point: dict, resume: bool) -> list[str]:
    args = ["fit", "--config", str(sweep["base"]), "--trainer.default_root_dir", str(point_dir(sweep, point))]
    for key, value in point["overrides"].items():
        args += [f"--{key}", cli_value(value)]
    if point["seed"] is not None:
        args += ["--seed_everything", str(point["seed"])]
    if resume:
        args += ["--ckpt_path", "last"]
    return args


def dry_run(sweep: dict, point: dict, index: int) -> str:
    """`# index name (what a run would do)` and the exact fit command (and eval command, when the sweep has
    `eval:`), as a user would type them."""
    folder = point_dir(sweep, point)
    state = read_status(folder).get("status", "pending")
    resume = state != "ok" and has_checkpoint(folder)
    note = "done, would be skipped" if state == "ok" else "would resume from its newest checkpoint" if resume else state
    command = shlex.join(["python", "-m", "phi3lit", *fit_args(sweep, point, resume)])
    if sweep["eval"]:
        command += "\n" + shlex.join(["python", "-m", "phi3lit", *eval_args(sweep, point)])
    return f"# {index} {point['name']} ({note})\n{command}"


# ---------------------------------------------------------------------------- a point's folder
def point_dir(sweep: dict, point: dict) -> Path:
    return Path(sweep["root"]) / sweep["name"] / point["name"]


def has_checkpoint(folder: Path) -> bool:
    """Any `*.ckpt` in the point's checkpoints/: a kill between `step=N.ckpt` and `last.ckpt` leaves only the
    former, and `fit --ckpt_path last` resumes from the newest intact one; a fresh start would be refused."""
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any(ckpts.glob("*.ckpt"))


def open_nofollow(path: Path, flags: int, what: str) -> int:
    """os.open with O_NOFOLLOW: a symlink planted at a file ablate writes is refused in one line, never followed
    (its target would be truncated or written)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EnvironmentProblem(
                f"{path}: is a symbolic link; ablate does not follow it ({what}). Remove it and rerun"
            ) from None
        raise


def read_status(folder: Path) -> dict:
    """ablate's record of the point: {"status": running | stopped | ok | failed, "wall_s", ...}; {} before it ran."""
    try:
        return json.loads((folder / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(folder: Path, **status) -> None:
    # Written beside and renamed: the rename replaces a symlink at status.json; it never writes through one.
    write_text_atomic(folder / "status.json", json.dumps(status, indent=2))
