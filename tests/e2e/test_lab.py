"""The offline lab's promise (README command 1): LoRA on the pretrained tiny base learns to answer, in chat,
questions about people the fine-tuning never saw, and the base alone cannot."""

import json

from helpers import run_main


def demo_score(tmp_path, name: str, source: list[str]) -> float:
    run_main(["eval", *source, "--tasks", "[phi3lit_demo]", "--output_path", str(tmp_path / name)])
    return json.loads((tmp_path / name / "results.json").read_text())["phi3lit_demo"]["exact_match,reply"]


def test_the_default_adapter_answers_held_out_questions_and_the_base_does_not(run_dir, tmp_path):
    adapter = demo_score(tmp_path, "adapter", ["--adapter", str(run_dir / "adapter")])
    base = demo_score(tmp_path, "base", ["--model", "builtin:tiny-phi3"])
    assert adapter >= 0.8, adapter
    assert base <= 0.1, base
