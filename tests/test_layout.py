"""The package's shape, per package: each package (a sub-package counts as one) has a layer and imports only from its
own package or from packages of lower layers, function-local imports included; no module imports itself in a cycle;
the recipe path stays free of torch. docs/architecture.md describes the same layers.

Imports under `if TYPE_CHECKING:` never run and are not counted: they name a type, not a dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qtune"

# Each package's layer. The registries (export.formats, training.methods) sit below the recipe, which is made of their
# names and sections; the commands that use a whole recipe (training, export) sit above it.
LAYERS = {
    0: ["core", "modeling.moe"],
    1: ["data", "modeling"],
    2: ["demo", "export.formats.gguf", "export.formats.gptq", "training.rewards"],
    3: ["export.formats", "training.methods"],
    4: ["config"],
    5: ["planning"],
    6: ["evaluation"],
    7: ["evaluation.tasks"],
    8: ["publish"],
    9: ["training", "export"],
    10: ["pipeline"],
    11: ["cli"],
    12: ["__init__", "__main__"],  # qtune.train() and `python -m qtune`
}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}


def module_name(path: Path) -> str:
    """qtune/export/formats/gguf/writer.py -> export.formats.gguf.writer; a package's __init__ -> the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def package_of(module: str, known: dict[str, Path]) -> str:
    """The package a module belongs to: its own name for a package (__init__.py), else its parent's."""
    path = known[module]
    if path.name == "__init__.py" and path.parent != PACKAGE:
        return module
    return module.rsplit(".", 1)[0] if "." in module else module


def runtime_nodes(tree: ast.Module):
    """Every node of the module except those under `if TYPE_CHECKING:`."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every qtune module `path` imports when it runs, at the top or inside a function."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qtune":
            base = node.module.removeprefix("qtune").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in known else base or "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("qtune.") for a in node.names if a.name.startswith("qtune."))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_every_package_has_a_layer():
    known = modules()
    packages = {package_of(name, known) for name in known}
    assert sorted(packages - set(LAYER)) == []
    assert sorted(set(LAYER) - packages) == []


def test_no_package_imports_from_its_own_layer_or_above():
    known = modules()
    upward = [
        f"{name} ({package_of(name, known)}, layer {LAYER[package_of(name, known)]}) imports {dep} "
        f"({package_of(dep, known)}, layer {LAYER[package_of(dep, known)]})"
        for name, deps in graph().items()
        for dep in sorted(deps)
        if package_of(dep, known) != package_of(name, known)
        and LAYER[package_of(dep, known)] >= LAYER[package_of(name, known)]
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


def test_the_checker_sees_function_local_and_upward_imports_and_skips_type_only_ones(tmp_path):
    """The checks above must be able to fail: a function-local import of a higher layer is found; an import that only
    names a type is not a dependency."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qtune.config.recipe import Recipe\n"
        "def f():\n    from qtune.training.run import train\n    from qtune.publish import hub\n"
    )
    known = modules()
    assert imports_of(probe, known) == {"training.run", "publish.hub"}
    assert LAYER[package_of("training.run", known)] > LAYER[package_of("core.fs", known)]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_600_lines(path):
    """A cap that keeps files readable; one concept stays in one file up to it."""
    assert len(path.read_text().splitlines()) <= 600


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


def test_public_functions_say_what_they_do():
    """Every public function and method of the package has a docstring (its first line says what it does)."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        members = [node for cls in tree.body if isinstance(cls, ast.ClassDef) for node in cls.body]
        for node in tree.body + members:  # module-level functions and classes, and the classes' methods
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not node.name.startswith("_") and ast.get_docstring(node) is None:
                    missing.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert missing == []


def test_validate_and_recipe_errors_import_no_torch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: m}\nlora: {rank: 8}\n")
    probe = (
        "import sys; from qtune.cli import main; codes = [main(['validate', sys.argv[1]]), main(['train', sys.argv[1]])]; "
        "print(codes, sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True)
    assert done.stdout.strip() == "[2, 2] []", done.stderr[-2000:]


def test_validating_a_whole_recipe_imports_no_torch(tmp_path):
    """The registries the recipe is made of (methods, formats, data kinds) and validate's checks of the files it
    names stay light to import: no torch, no numpy."""
    import json

    (tmp_path / "runs" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "runs" / "tiny-llama" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "runs" / "demo" / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "runs" / "demo" / "adapter" / name).write_text("{}")
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    (tmp_path / "runs" / "demo-preference.jsonl").write_text(json.dumps(pair) + "\n")
    recipe = PACKAGE.parent / "recipes" / "demo-dpo.yaml"
    probe = (
        f"import sys; from qtune.cli import main; code = main(['validate', {str(recipe)!r}]); "
        "print(code, sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr[-2000:]
