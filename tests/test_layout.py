"""The house rules a newcomer relies on: one-sitting modules, dependencies that run one way, a quiet `plan`."""

import ast
import os
import subprocess
import sys

import pytest
from helpers import ROOT

PACKAGE = ROOT / "phi3lit"


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def phi3lit_imports(path) -> set[str]:
    """Every phi3lit module `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phi3lit"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from phi3lit import attention`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("phi3lit"))
    return out


def test_no_module_is_longer_than_one_sitting():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in lengths.items() if n > 400} == {}


def test_no_import_cycle():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in phi3lit_imports(p) if i in modules and i != m} for m, p in modules.items()}
    assert find_cycle(graph) is None, find_cycle(graph)


def find_cycle(graph: dict[str, set[str]]) -> str | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return " -> ".join([*path[path.index(n) :], n])
            if n not in state and (cycle := visit(n, [*path, n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == "a -> b -> c -> a"
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_plan_prints_the_plan_and_nothing_else():
    cmd = [sys.executable, "-m", "phi3lit", "plan", "--config", str(ROOT / "configs" / "phi3-mini-4k-lora.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("plan for microsoft/Phi-3-mini-4k-instruct (bf16-mixed")
    assert "warn" not in proc.stdout.lower() and "Tip" not in proc.stdout


def test_library_chatter_on_import_is_filtered():
    """bitsandbytes (QLoRA) asks `kernels` for an optional CPU kernel on import; offline, `kernels` logs that it
    skips a publisher check. Neither says anything a phi3lit user can act on, so neither reaches the terminal."""
    pytest.importorskip("bitsandbytes")
    code = "from phi3lit.console import quiet; quiet(); import bitsandbytes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""
