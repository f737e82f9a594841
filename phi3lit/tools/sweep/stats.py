"""Statistics over seeds, and comparing runs at equal tokens seen: the numbers behind a sweep's summary.

A grid point run with several seeds is summarised per metric by the mean, the sample standard deviation (n - 1)
and the 95% Student-t interval of the mean, mean ± t(0.975, n - 1) · s / √n. One seed gives a mean and nothing
else. Points are ranked by the mean of the first of `STAT_METRICS`; a point whose difference from the best is
smaller than the seed spread (the larger of the two standard deviations) is marked `within_seed_spread: yes`:
its seeds do not tell it apart from the best.

Runs that trained on different numbers of tokens are compared at equal tokens seen (`at_equal_tokens`): the
budget T is the smallest final tokens-seen among them (the most every run reached); a run that evaluated at T
gives that measured value, any other its value linearly interpolated in tokens between the two evaluations that
bracket T, and the token counts used are returned with it. Pure Python: no torch, no numpy, no scipy.
"""

from __future__ import annotations

import math
import statistics

# Metrics summarised over seeds (mean, std, 95% interval); the first one ranks the points.
STAT_METRICS = ["eq_val_loss", "best_val_loss", "final_val_loss", "val_token_acc", "tokens_per_sec"]

# Two-sided 95% Student-t quantiles t(0.975, df), df = 1..30 (standard tables); above 30 the next lower listed df
# (conservative). scipy is not a dependency; tests/tools/test_analyze.py checks the table against scipy when present.
T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip
T975_LARGE = [(120, 1.980), (60, 2.000), (40, 2.021), (30, 2.042)]


def number(value) -> float | None:
    """A value as a float, or None when it is not a number (``""``, None, text); summary cells are often strings."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    return next((t for limit, t in T975_LARGE if df >= limit), T975[-1])


def seed_stats(values: list[float]) -> dict:
    """n, mean, sample std (n-1) and the 95% Student-t interval of the mean; std and interval need two values."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "lo": None, "hi": None}
    std = statistics.stdev(values)
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def at_equal_tokens(curves: dict[str, list[tuple[float, float]]]) -> tuple[float | None, dict, dict]:
    """Compare runs at equal tokens seen: (T, {run: value at T}, {run: (t0, t1)}).

    T is the largest token count every curve reached (the smallest final tokens-seen). A curve that evaluated at
    T gives that value, measured (t0 = t1 = T). Otherwise its value is linearly interpolated in tokens between its
    last evaluation before T (t0) and its first after (t1): an estimate, and (t0, t1) says so. A curve with no
    evaluation before T gives None (and (None, None)). Curves are (tokens, value); a token count logged twice (a
    resumed run validating the same step again) counts once, with its last value."""
    curves = {k: sorted(dict(c).items()) for k, c in curves.items()}  # dict(): the last value per token count
    finals = [c[-1][0] for c in curves.values() if c]
    if not finals:
        return None, {k: None for k in curves}, {k: (None, None) for k in curves}
    budget = min(finals)
    values, where = {}, {}
    for k, c in curves.items():
        before = [(t, v) for t, v in c if t <= budget]
        after = [(t, v) for t, v in c if t > budget]
        if not before:
            values[k], where[k] = None, (None, None)
        elif before[-1][0] == budget or not after:
            values[k], where[k] = before[-1][1], (before[-1][0], before[-1][0])
        else:
            (t0, v0), (t1, v1) = before[-1], after[0]
            values[k], where[k] = v0 + (v1 - v0) * (budget - t0) / (t1 - t0), (t0, t1)
    return budget, values, where


def stats_rows(keys: list[str], rows: list[dict], metrics: list[str] = STAT_METRICS) -> list[dict]:
    """One row per grid point (rows grouped by their `keys` columns): its seeds' mean, std and 95% interval per
    metric of `metrics` (`STAT_METRICS`, and the downstream scores when `eval` ran), and how it compares to the
    best (by the first of `STAT_METRICS`).

    A point whose `eq_val_loss` mean differs from the best point's by less than the larger of the two seed
    standard deviations is marked `within_seed_spread: yes`: the seeds do not tell them apart."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in keys), []).append(r)
    out = []
    for combo, group in groups.items():
        done = [r for r in group if r["status"] == "ok"]
        first = done[0] if done else group[0]
        stat = {k: v for k, v in zip(keys, combo, strict=True)}
        stat |= {"n_ok": len(done), "n_runs": len(group), "scale": first.get("scale", "")}
        stat |= {"trainable_params": first.get("trainable_params", ""), "eq_tokens": first.get("eq_tokens", "")}
        for m in metrics:
            st = seed_stats([v for v in (number(r.get(m)) for r in done) if v is not None])
            stat[f"_{m}"] = st
            for part in ("mean", "std", "lo", "hi"):
                column = f"{m}_{part}" if part in ("mean", "std") else f"{m}_ci95_{part}"
                stat[column] = "" if st[part] is None else round(st[part], 6)
        out.append(stat)
    primary = STAT_METRICS[0]
    ranked = [s for s in out if s[f"_{primary}"]["mean"] is not None]
    best = min(ranked, key=lambda s: s[f"_{primary}"]["mean"]) if ranked else None
    for s in out:
        st = s[f"_{primary}"]
        s["vs_best"] = s["within_seed_spread"] = ""
        if best is None or st["mean"] is None:
            continue
        if s is best:
            s["vs_best"] = "best"
            continue
        delta = st["mean"] - best[f"_{primary}"]["mean"]
        s["vs_best"] = round(delta, 6)
        if st["std"] is not None and best[f"_{primary}"]["std"] is not None:
            spread = max(st["std"], best[f"_{primary}"]["std"])
            s["within_seed_spread"] = "yes" if abs(delta) < spread else "no"
    return out


def stat_cell(st: dict, digits: int = 4) -> str:
    """A `seed_stats` result as a table cell: `mean ± std [lo, hi]`, only the mean for one seed, `–` for none."""
    if st["n"] == 0:
        return "–"
    if st["std"] is None:
        return _fixed(st["mean"], digits)
    mean, std, lo, hi = (_fixed(st[k], digits) for k in ("mean", "std", "lo", "hi"))
    return f"{mean} ± {std} [{lo}, {hi}]"


def _fixed(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"
