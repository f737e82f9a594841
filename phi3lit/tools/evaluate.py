"""`python -m phi3lit eval`: downstream scores of an adapter or a model, on EleutherAI's lm-evaluation-harness.

Val loss and perplexity are not what papers report; task scores are. Like `litgpt evaluate` and torchtune's
`eleuther_eval`, phi3lit hands the model to lm-eval's Hugging Face backend (`HFLM`: the base by name, the adapter
as a peft folder, prompts rendered with the model's own chat template) and runs any lm-eval task by name, plus
the project's own task YAMLs in `phi3lit/tools/eval_tasks/` (`phi3lit_demo`: generate-until with the Phi-3
chat template, scored by exact match). What runs is lm-eval's code, not a re-implementation, so a score is the
number other tools report for the same model and task.

What it writes: lm-eval's results (`results.json`) and each task's generations (`samples_<task>.jsonl`) in
`--output_path`; when the adapter is a run's (`<run>/adapter`), the scores also go to the run's TensorBoard
(`eval/<task>/<metric>`, at the run's last step), where a sweep's summary reads them as columns.

Tasks whose data lm-eval downloads (MMLU, GSM8K, IFEval, ...) work where the hub is reachable (or its datasets
cache holds them); where it is not, `eval` says so in one line.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_info

from phi3lit.errors import ConfigError, EnvironmentProblem
from phi3lit.files import write_text_atomic
from phi3lit.hub import resolve_pretrained
from phi3lit.model.adapter import read_adapter_config

TASKS_DIR = Path(__file__).parent / "eval_tasks"  # the project's own task YAMLs (their data files beside them)


def project_tasks() -> dict[str, dict]:
    """The shipped task configs by name, their data files made absolute (lm-eval reads paths from the cwd)."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str(TASKS_DIR / name)
        out[config["task"]] = config
    return out


def evaluate(
    tasks: list[str],
    adapter: str | None = None,
    model: str | None = None,
    ckpt: str | None = None,
    output_path: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score an adapter, a model or a checkpoint on lm-eval tasks.

    Args:
        tasks: lm-eval task names (any lm-eval task, or a project task such as phi3lit_demo).
        adapter: a peft adapter folder (a run's <run>/adapter); its base is the one its config names.
        model: a base or merged model alone: hub id, local folder or builtin:tiny-phi3.
        ckpt: a phi3lit checkpoint; its LoRA weights are exported to a temporary adapter first.
        output_path: folder for results.json and samples_<task>.jsonl (created; default: nothing written).
        batch_size: generations per batch.
        limit: score only the first N examples of each task (a quick look, not a result).
        include_path: a folder of your own lm-eval task YAMLs, named in --tasks like lm-eval's own.

    Returns {task: {metric: value}}.
    """
    if sum(x is not None for x in (adapter, model, ckpt)) != 1:
        raise ConfigError("eval: give exactly one of --adapter DIR, --model NAME_OR_DIR or --ckpt FILE")
    if not tasks:
        raise ConfigError("eval: --tasks names at least one task (for example --tasks [phi3lit_demo])")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ConfigError(f"eval: --batch_size ({batch_size}) and --limit ({limit}) must be >= 1")
    if ckpt is not None:
        from phi3lit.export.export import export

        with tempfile.TemporaryDirectory(prefix="phi3lit-eval-") as tmp:
            export(ckpt=ckpt, out=str(Path(tmp) / "adapter"))
            return _evaluate(tasks, str(Path(tmp) / "adapter"), None, output_path, batch_size, limit, include_path)
    if adapter is not None:
        return _evaluate(tasks, adapter, None, output_path, batch_size, limit, include_path)
    return _evaluate(tasks, None, model, output_path, batch_size, limit, include_path)


def _evaluate(tasks, adapter, model, output_path, batch_size, limit, include_path) -> dict[str, dict[str, float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    if adapter is not None:
        base = read_adapter_config(adapter, "--adapter")["base_model_name_or_path"]
        model_args = {"pretrained": resolve_pretrained(base), "peft": str(Path(adapter).resolve())}
    else:
        model_args = {"pretrained": resolve_pretrained(model)}
    cpu = _cpu()
    lm = _hf_model()(**model_args, dtype="float32" if cpu else "bfloat16", batch_size=batch_size,
                     device="cpu" if cpu else "cuda")  # fmt: skip
    ours = project_tasks()
    wanted = [ours.get(name, name) for name in tasks]
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=wanted,
            apply_chat_template=True,  # the model's own chat template, as phi3lit trains and chat replies
            log_samples=True,
            limit=limit,
            task_manager=TaskManager(include_path=include_path),
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
        )
    except (ConnectionError, TimeoutError) as e:
        raise EnvironmentProblem(f"eval --tasks {tasks}: the task data cannot be downloaded here ({e})") from None
    except (KeyError, ValueError) as e:  # lm-eval: unknown task names
        raise ConfigError(f"eval --tasks {tasks}: {str(e).splitlines()[0]} (lm-eval --tasks list names them)") from None
    except OSError as e:  # offline hub, missing dataset files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EnvironmentProblem(f"eval --tasks {tasks}: the task data is not reachable here ({first})") from None
    scores = {
        task: {k.split(",")[0]: float(v) for k, v in result.items() if _is_score(k, v)}
        for task, result in out["results"].items()
    }
    if output_path is not None:
        folder = Path(output_path)
        write_text_atomic(folder / "results.json", json.dumps(out["results"], indent=2, default=float))
        for task, samples in out.get("samples", {}).items():
            rows = [json.dumps(s, default=str) + "\n" for s in samples]
            write_text_atomic(folder / f"samples_{task}.jsonl", "".join(rows))
    run = Path(adapter).parent if adapter is not None and Path(adapter).name == "adapter" else None
    if run is not None and (run / "tb").is_dir():  # a run's adapter: the scores join its curves
        log_scores(run / "tb", scores)
    for task, metrics in scores.items():
        rank_zero_info(f"[phi3lit] eval {task}: " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    return scores


def _hf_model():
    """lm-eval's Hugging Face backend, cutting generations at the turn end as the chat template means it.

    HFLM decodes a generation with `skip_special_tokens=True` and only then cuts it at the task's `until` strings.
    Phi-3's turn end `<|end|>` is a special token, so it is gone before the cut, and in a batch a row that ended
    early keeps what was generated after its end (the batch goes on for the other rows). Decoding with the special
    tokens kept lets the cut find `<|end|>`; the text before it is what `chat` shows.
    """
    from lm_eval.models.huggingface import HFLM

    class TurnEndHFLM(HFLM):
        def tok_decode(self, tokens, skip_special_tokens: bool = False):
            return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)

    return TurnEndHFLM


def _is_score(key: str, value) -> bool:
    return "_stderr" not in key and key not in ("alias", "name", "sample_len") and isinstance(value, int | float)


def _cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def log_scores(tb: Path, scores: dict[str, dict[str, float]]) -> None:
    """`eval/<task>/<metric>` scalars in the run's TensorBoard, at the run's last logged step."""
    from torch.utils.tensorboard import SummaryWriter

    from phi3lit.run.events import read_scalars

    steps = [step for points in read_scalars(str(tb)).values() for step, _ in points]
    writer = SummaryWriter(str(tb))
    try:
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                if not math.isnan(value):
                    writer.add_scalar(f"eval/{task}/{metric}", value, global_step=max(steps, default=0))
    finally:
        writer.close()
