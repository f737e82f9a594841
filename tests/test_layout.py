"""The house rules a newcomer relies on: one-sitting modules, dependencies that run one way, a quiet `plan`."""

import ast
import os
import re
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


# The layers, bottom up: a module may import its own layer and the ones before it, never one after it.
LAYERS = [
    (
        "base",
        {
            "phi3lit",
            "phi3lit.errors",
            "phi3lit.hub",
            "phi3lit.family",
            "phi3lit.tiny",
            "phi3lit.tiny.world",
            "phi3lit.tiny.pretrain",
            "phi3lit.tiny.__main__",
            "phi3lit.checkpoint",
            "phi3lit.lightning_compat",
            "phi3lit.console",
            "phi3lit.files",
            "phi3lit.savedrun",
        },
    ),
    ("data", "phi3lit.data"),
    ("model", "phi3lit.model"),
    ("run", "phi3lit.run"),
    ("export", "phi3lit.export"),
    ("tools", "phi3lit.tools"),
    ("cli", {"phi3lit.cli", "phi3lit.__main__"}),
]


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if isinstance(members, set) and module in members:
            return i
        if isinstance(members, str) and (module == members or module.startswith(members + ".")):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and to docs/development.md)")


def upward_imports(modules: dict) -> list[str]:
    out = set()
    for m, path in modules.items():
        for target in phi3lit_imports(path):
            while target not in modules and "." in target:  # `from phi3lit.data import X` names a package member
                target = target.rsplit(".", 1)[0]
            if target in modules and layer_of(target) > layer_of(m):
                out.add(f"{m} ({LAYERS[layer_of(m)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    return sorted(out)


def test_layers_import_downward_only():
    """base -> data -> model -> run -> export -> tools -> cli: function-level imports count too."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert upward_imports(modules) == []


def test_the_layer_check_finds_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from phi3lit.export.clients import CLIENTS\n")
    assert upward_imports({"phi3lit.data.bad": bad, "phi3lit.export.clients": bad}) == [
        "phi3lit.data.bad (data) imports phi3lit.export.clients (export)"
    ]


def test_the_top_of_the_package_is_the_base_and_the_command_line():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    assert all(layer_of(module_name(p)) in (0, len(LAYERS) - 1) for p in PACKAGE.glob("*.py"))


def test_the_docs_name_the_tree_as_it_is():
    """Every module has its API page entry, and every phi3lit/ path the README or the docs mention exists (the
    "Where to change what" table included), so a move that forgets the docs fails here."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    api = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    modules = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if f"::: {m}\n" not in api + "\n"] == []
    mentioned = {m for p in docs for m in re.findall(r"phi3lit/[\w/]+\.py", p.read_text())}
    assert mentioned and sorted(m for m in mentioned if not (ROOT / m).is_file()) == []


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == "a -> b -> c -> a"
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_plan_prints_the_plan_and_nothing_else():
    configs = [
        "--config",
        str(ROOT / "configs" / "recipe.yaml"),
        "--config",
        str(ROOT / "configs" / "models" / "phi3-mini-4k.yaml"),
    ]
    cmd = [sys.executable, "-m", "phi3lit", "plan", *configs]
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
