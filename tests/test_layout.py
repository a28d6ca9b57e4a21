"""The package's shape: layers that import only downwards (function-local imports included), no cycles, no module
past ~400 lines, and the recipe path free of torch. README "How the code is laid out" describes the same layers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qtune"

# Each module's layer; a module imports only from its own layer (without cycles) or below.
LAYERS = {
    0: [
        "errors",
        "gguf_support",
        "recipe_sections",
        "recipe",
        "fsutil",
        "testhooks",
        "plots",
        "library_noise",
        "cuda_setup",
    ],
    1: [
        "run_dir",
        "rows",
        "weights",
        "data",
        "preference",
        "model",
        "batching",
        "loss",
        "offload",
        "lean_ops",
        "checkpoints",
        "distributed",
        "cpu_threads",
        "tiny_models",
        "demo_task",
        "metrics",
        "memory",
        "task_scores",
    ],
    2: ["plan", "hub"],
    3: ["report_page", "evaluate", "chat", "task_models", "task_eval"],
    4: [
        "export.gguf",
        "export.gguf_family",
        "export.gguf_types",
        "export.kquants",
        "export.merge",
        "export.nf4",
        "export.run",
        "export",
        "training.config",
        "training.callbacks",
        "training.trainer",
        "training.preference",
        "training.resume",
        "training.report",
        "training.run",
        "training",
    ],
    5: ["pipeline"],
    6: ["cli", "cli_parser", "__main__", "__init__"],
}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every qtune module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qtune":
            base = node.module.removeprefix("qtune").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in LAYER else base or "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("qtune.") for a in node.names if a.name.startswith("qtune."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LAYER)) == []


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{name} (layer {LAYER[name]}) imports {dep} (layer {LAYER[dep]})"
        for name, deps in graph().items()
        for dep in sorted(deps)
        if LAYER[dep] > LAYER[name]
    ]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_function_local_and_upward_imports(tmp_path):
    """The checks above must be able to fail: a function-local import of a higher layer is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from qtune.training.run import train\n    from qtune import hub\n")
    assert imports_of(probe) == {"training.run", "hub"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_classes_live_at_module_level():
    """No class statement inside a function: classes built by factories hide what a module provides."""
    nested = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [
                    f"{path.name}: {inner.name} in {node.name}"
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.ClassDef)
                ]
    assert nested == []


def test_validate_and_recipe_errors_import_no_torch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: m}\nlora: {rank: 8}\n")
    probe = (
        "import sys; from qtune.cli import main; codes = [main(['validate', sys.argv[1]]), main(['train', sys.argv[1]])]; "
        "print(codes, sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True)
    assert done.stdout.strip() == "[2, 2] []", done.stderr[-2000:]
