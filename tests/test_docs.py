"""The documentation says what the code does: the recipe reference is generated from the schema and must be the one
committed, every exit code is documented, and the README stays a landing page with the two commands CI runs."""

import re
from pathlib import Path

from qtune.core import errors

REPO = Path(__file__).resolve().parents[1]


def test_the_recipe_reference_is_generated_from_the_schema_and_not_stale():
    from qtune.config.reference import recipe_reference

    committed = (REPO / "docs" / "reference" / "recipe.md").read_text()
    assert committed == recipe_reference(), (
        "docs/reference/recipe.md is stale: python -m qtune.config.reference docs/reference/recipe.md"
    )


def test_the_reference_has_every_key_of_every_section():
    from qtune.config.recipe import Recipe
    from qtune.config.reference import nested_sections

    page = (REPO / "docs" / "reference" / "recipe.md").read_text()
    for name, section in nested_sections(Recipe):
        for key in section.model_fields:
            assert f"| `{name}.{key}` |" in page, f"{name}.{key}"
    assert "| `dpo.beta` |" in page and "| `gguf_q4_k_m` |" in page and "| `orpo` |" in page


def test_every_exit_code_is_documented():
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", page, flags=re.M)}
    assert set(codes.values()) <= documented, {n: v for n, v in codes.items() if v not in documented}


def test_the_readme_is_a_landing_page_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    demo = (
        'pip install torch==2.13.0 && pip install -c qtune/constraints.txt -e ".[eval]" && qtune make-tiny-model runs/'
    )
    tests = 'pip install torch==2.13.0 && pip install -c qtune/constraints.txt -e ".[test]" && python -m pytest'
    assert demo in readme and tests in readme
    assert tests.split(" && ")[-1] in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


def test_every_doc_page_is_in_the_site():
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = set()

    def walk(items):
        for item in items:
            for value in item.values():
                if isinstance(value, list):
                    walk(value)
                else:
                    listed.add(value)

    walk(config["nav"])
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert pages == listed


def test_the_loading_snippet_runs_on_a_run_and_prints_no_library_warning(llama_run):
    """The getting-started page's "Loading the result" block, on a finished run: it loads, and prints nothing (it
    printed peft's FutureWarning about `is_gradient_checkpointing`)."""
    import os
    import subprocess
    import sys

    from qtune.config.runs import open_run

    page = (REPO / "docs" / "getting-started.md").read_text()
    snippet = re.search(r"Loading the result:\n\n```python\n(.*?)```", page, re.S).group(1)
    base = open_run(llama_run).recipe.model.name
    code = snippet.replace('"runs/tiny-llama"', repr(base)).replace(
        '"runs/demo/adapter"', repr(str(llama_run / "adapter"))
    )
    assert code != snippet
    code += "\nprint(type(model).__name__, tokenizer.eos_token is not None)\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "PeftModelForCausalLM True"
    # transformers' "Loading weights" bar is all it may print
    assert [
        line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line
    ] == []


def test_the_demo_recipes_name_the_readmes_make_tiny_model_command():
    """Before: recipes/demo-dpo.yaml's comments left out --demo-task, so following them broke `qtune eval --tasks`."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"qtune make-tiny-model [^&]*", readme).group(0).strip()
    assert "--demo-task" in command
    for recipe in ("demo.yaml", "demo-dpo.yaml", "demo-grpo.yaml"):
        assert f"#   {command}\n" in (REPO / "recipes" / recipe).read_text(), recipe


def test_the_readmes_demo_ranges_hold_every_cpu_kind_measured():
    """Before: the README stated one machine's digits as what everyone gets. Now it states ranges, and each CPU kind's
    recorded run (bench/results/demo_figures-<kind>.json, written by bench/demo_figures.py) must fall inside them."""
    import json

    readme = (REPO / "README.md").read_text()
    number = r"(\d+(?:\.\d+)?)"
    loss = re.search(rf"eval loss goes from {number}-{number} to {number}-{number}", readme).groups()
    task = re.search(
        rf"no better than chance \({number} to {number} of 4 choices.*?\) to\s+{number}-{number}", readme, re.S
    ).groups()
    reward = re.search(rf"reward accuracy of {number}-{number}", readme).groups()
    runs = sorted((REPO / "bench" / "results").glob("demo_figures-*.json"))
    assert len(runs) >= 3, runs  # the kinds the README's ranges name
    for path in runs:
        run = json.loads(path.read_text())

        def inside(value, low, high, digits):
            return float(low) <= round(value, digits) <= float(high)

        assert inside(run["train"]["eval_loss_before"], *loss[:2], 1), path.name
        assert inside(run["train"]["eval_loss"], *loss[2:], 2), path.name
        scores = {
            name: entry["scores"]["demo_choice"]["acc"]["value"] for name, entry in run["tasks"]["artifacts"].items()
        }
        assert inside(scores["base (4-bit)"], *task[:2], 2) and inside(scores["adapter"], *task[2:], 2), path.name
        if "dpo" in run:  # recorded since 2026-12-06
            assert inside(run["dpo"]["eval_reward_accuracy"], *reward, 2), path.name
