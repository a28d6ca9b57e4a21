"""The tested set (qtune/constraints.txt) and `qtune doctor`: what an environment is, and how it differs from the
one qtune's tests and figures come from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qtune.core.environment import TESTED_FILE, cpu_kind, environment, tested_versions, version_differences

REPO = Path(__file__).resolve().parents[1]


def test_the_tested_set_is_inside_the_ranges_qtune_declares():
    """A pin outside pyproject's ranges would make `pip install -c` fail; a dependency without a pin would float."""
    import tomllib
    from packaging.requirements import Requirement

    from qtune.core.environment import package_key

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = tested_versions()
    outside = [
        f"{r.name} {pins[package_key(r.name)]} not in {r.specifier}"
        for r in declared
        if package_key(r.name) in pins and not r.specifier.contains(pins[package_key(r.name)], prereleases=True)
    ]
    assert outside == []
    ml_stack = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "tokenizers", "gguf")
    assert [name for name in ml_stack if name not in pins] == []


def test_the_readme_and_ci_install_the_tested_set():
    """Before: `pip install -e .` took whatever was newest (transformers 5.25 for a README measured on 5.24)."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[:2]
    assert len(commands) == 2 and all("-c qtune/constraints.txt" in command for command in commands)
    ci = (REPO / ".ci" / "run").read_text()
    assert "-c qtune/constraints.txt" in ci
    assert TESTED_FILE == REPO / "qtune" / "constraints.txt"


def test_a_version_other_than_the_tested_one_is_a_difference():
    differs = version_differences({"transformers": "0.0.1", "not-a-real-package": "1.0", "pytest": "0.0.2"})
    assert set(differs) == {"transformers", "pytest"}
    assert differs["transformers"]["tested"] == "0.0.1" and differs["transformers"]["installed"]
    # a local build label is the same release: torch 2.13.0+cpu is the tested 2.13.0
    from qtune.core.environment import same_release

    assert same_release("2.13.0+cpu", "2.13.0") and not same_release("2.13.1", "2.13.0")


@pytest.mark.parametrize(
    "model, features, kind",
    [
        (
            "Intel(R) Xeon(R) Processor @ 2.10GHz",
            ["avx2", "avx512f", "avx512_bf16", "amx_bf16"],
            "Intel Xeon with AVX512-BF16 and AMX",
        ),
        ("AMD EPYC", ["avx2", "avx512f", "avx512_bf16"], "AMD EPYC with AVX512-BF16"),
        ("AMD EPYC 7B13 64-Core Processor", ["avx2"], "AMD EPYC without AVX512-BF16 (AVX2)"),
    ],
)
def test_the_cpu_kind_names_what_changes_the_digits(model, features, kind):
    assert cpu_kind(model, features) == kind


def test_doctor_prints_versions_cpu_gpu_and_the_differences():
    done = subprocess.run([sys.executable, "-m", "qtune", "doctor"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("qtune ") and lines[2].startswith("CPU kind: ") and lines[3].startswith("GPU: ")
    for name in tested_versions():
        assert any(line.split()[:1] == [name] for line in lines), name
    differs = version_differences()
    assert lines[-1] == "every installed package is at its tested version" or not differs
    as_json = subprocess.run([sys.executable, "-m", "qtune", "doctor", "--json"], capture_output=True, text=True)
    record = json.loads(as_json.stdout)
    assert record["cpu"] == {**environment(gpu=False)["cpu"], "torch_kernels": record["cpu"]["torch_kernels"]}
    assert record["cpu"]["torch_kernels"] in ("AVX512", "AVX2", "DEFAULT") and record["differs_from_tested"] == differs
    lowered = subprocess.run(
        [sys.executable, "-m", "qtune", "doctor", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
    )
    assert json.loads(lowered.stdout)["cpu"]["torch_kernels"] in ("AVX2", "DEFAULT")  # what the AVX2 figures ran
