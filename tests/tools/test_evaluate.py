"""`phi3lit eval`: lm-evaluation-harness scores an adapter as the user runs it, and the score is the exact match of
the generations (checked against phi3lit's own greedy decoding of the same prompts); scores reach TensorBoard."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import run_main

from phi3lit.__main__ import main
from phi3lit.tools.evaluate import TASKS_DIR

pytest.importorskip("lm_eval")


@pytest.fixture
def run(run_dir, tmp_path):
    """A copy of the session's trained tiny run (eval writes into its TensorBoard)."""
    out = tmp_path / "run"
    for part in ("adapter", "tb"):
        shutil.copytree(run_dir / part, out / part)
    return out


def greedy_replies(adapter, questions: list[str]) -> list[str]:
    """phi3lit's own decoding (KV cache, stop at <|end|>) of the questions, on the adapter as stock peft loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi3lit.hub import resolve_pretrained
    from phi3lit.model.generate import generate_replies

    name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = resolve_pretrained(name)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    chats = [[{"role": "user", "content": q}] for q in questions]
    with torch.no_grad():
        return [
            r.strip() for r in generate_replies(model, AutoTokenizer.from_pretrained(base), chats, max_new_tokens=64)
        ]


def test_eval_score_is_the_exact_match_of_the_generations_and_lands_in_tensorboard(run, tmp_path):
    """A local task whose answers are the adapter's own greedy replies for 3 questions and wrong for 2: lm-eval's
    exact match is exactly 3/5, its generations are phi3lit's own decoding of the Phi-3 chat prompts, and the score
    reaches the run's TensorBoard."""
    demo = [json.loads(line) for line in (TASKS_DIR / "phi3lit_demo.jsonl").read_text().splitlines()][:5]
    replies = greedy_replies(run / "adapter", [d["question"] for d in demo])
    answers = [r if i < 3 else r + " (not this)" for i, r in enumerate(replies)]
    rows = [{"question": d["question"], "answer": a} for d, a in zip(demo, answers, strict=True)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load((TASKS_DIR / "phi3lit_demo.yaml").read_text())
    config.update(task="mine", dataset_kwargs={"data_files": {"test": str(tasks / "mine.jsonl")}})
    (tasks / "mine.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    printed = run_main(["eval", "--adapter", str(run / "adapter"), "--tasks", "[mine]", "--include_path", str(tasks),
                        "--output_path", str(out)])  # fmt: skip
    results = json.loads((out / "results.json").read_text())["mine"]
    samples = [json.loads(line) for line in (out / "samples_mine.jsonl").read_text().splitlines()]
    assert results["exact_match,reply"] == pytest.approx(3 / 5)
    assert "[phi3lit] eval mine: exact_match 0.6000" in printed
    assert [s["filtered_resps"][0].strip() for s in samples] == replies
    assert all(s["arguments"][0][0] == f"<|user|>\n{s['doc']['question']}<|end|>\n<|assistant|>\n" for s in samples)
    from phi3lit.run.events import read_scalars

    logged = read_scalars(str(run / "tb"))["eval/mine/exact_match"]
    assert [v for _, v in logged] == [pytest.approx(3 / 5)]


def test_a_checkpoint_scores_as_its_adapter_and_the_demo_task_runs_by_name(run_dir, tmp_path):
    """`--ckpt` exports the LoRA weights and scores them: the same generations as the run's own adapter."""
    for name, source in (("adapter", ["--adapter", str(run_dir / "adapter")]),
                         ("ckpt", ["--ckpt", str(run_dir / "checkpoints" / "last.ckpt")])):  # fmt: skip
        printed = run_main(["eval", *source, "--tasks", "[phi3lit_demo]", "--limit", "2", "--output_path",
                            str(tmp_path / name)])  # fmt: skip
        assert "[phi3lit] eval phi3lit_demo: exact_match " in printed
    generations = [
        [
            json.loads(line)["resps"]
            for line in (tmp_path / name / "samples_phi3lit_demo.jsonl").read_text().splitlines()
        ]
        for name in ("adapter", "ckpt")
    ]
    assert generations[0] == generations[1] and len(generations[0]) == 2


def test_eval_needs_exactly_one_thing_to_score(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--tasks", "[phi3lit_demo]"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "give exactly one of --adapter DIR, --model NAME_OR_DIR or --ckpt FILE" in err


def test_a_task_whose_data_is_out_of_reach_is_refused_in_one_line(capsys):
    """MMLU, GSM8K, IFEval... download their data: offline (as every test runs) that is one line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "builtin:tiny-phi3", "--tasks", "[mmlu_abstract_algebra]", "--limit", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "eval --tasks ['mmlu_abstract_algebra']: the task data cannot be downloaded here" in err, err
