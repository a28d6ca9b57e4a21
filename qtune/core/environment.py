"""The environment a run happens in, as one record: the versions of the libraries qtune builds on and how they differ
from the tested set (qtune/constraints.txt), the Python, the CPU and the GPU. `qtune doctor` prints it, every run
keeps it in metrics.json, and the report page and the model card quote it.

The CPU matters beyond speed: the same command gives other digits on another kind of CPU, because torch picks its
CPU kernels by the instructions it finds (`torch.backends.cpu.get_cpu_capability()`: AVX2 or AVX512) and the math
libraries pick theirs by vendor, and each rounds differently. So a figure is stated with the CPU kind it came from,
in the words `cpu_kind` uses, and the record keeps torch's kernel level. (`ATEN_CPU_CAPABILITY=avx2` makes an AVX512
machine run the AVX2 kernels: bench/README.md reproduces the AVX2 figures that way.)
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

TESTED_FILE = Path(__file__).resolve().parent.parent / "constraints.txt"
# CPU features that change which kernels torch runs, as /proc/cpuinfo names them
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def package_key(name: str) -> str:
    """A distribution name as pip compares them: lower case, '-' for '_' and '.'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def tested_versions(path: Path = TESTED_FILE) -> dict[str, str]:
    """{package: version} of the tested set, read from the constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[package_key(name)] = version.split(";")[0].strip()
    return pins


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def same_release(installed: str, tested: str) -> bool:
    """Whether an installed version is the tested one; a local build label (torch's +cpu, +cu128) does not count."""
    return installed.split("+")[0] == tested


def version_differences(tested: dict[str, str] | None = None) -> dict[str, dict]:
    """{package: {"installed", "tested"}} for each installed package of the tested set at another version."""
    tested = tested_versions() if tested is None else tested
    found = {name: installed_version(name) for name in tested}
    return {
        name: {"installed": found[name], "tested": version}
        for name, version in tested.items()
        if found[name] is not None and not same_release(found[name], version)
    }


def cpu_description() -> dict:
    """The CPU's model name, the cores this process may use, the kernel-relevant features, and its kind."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model name platform gives, no flags
        pass
    features = [name for name in CPU_FEATURES if name in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "features": features, "kind": cpu_kind(model, features)}


def cpu_kind(model: str, features: list[str]) -> str:
    """The CPU as figures name it: vendor and family, and the features that change the digits ("AMD EPYC with
    AVX512-BF16", "Intel Xeon with AVX512-BF16 and AMX", "AMD EPYC without AVX512-BF16 (AVX2)")."""
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", "", model)
    words = name.split()
    family = " ".join(words[:2]) if words else "unknown CPU"
    if "avx512_bf16" in features:
        return f"{family} with AVX512-BF16" + (" and AMX" if "amx_bf16" in features else "")
    widest = "AVX512" if "avx512f" in features else "AVX2" if "avx2" in features else "no AVX2"
    return f"{family} without AVX512-BF16 ({widest})"


def torch_cpu_kernels() -> str:
    """The instruction level of torch's CPU kernels in this process (AVX512, AVX2, DEFAULT; ATEN_CPU_CAPABILITY
    lowers it)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def gpu_description() -> dict | None:
    """The first visible CUDA GPU (name, memory, compute capability, CUDA version, count), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return {
        "name": properties.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "capability": f"{properties.major}.{properties.minor}",
        "cuda": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(),
    }


def environment(*, gpu: bool = True) -> dict:
    """The whole record: qtune, Python, platform, CPU, GPU (None without one; not asked when gpu=False, which keeps
    torch unimported), the installed version of each package of the tested set, and where they differ from it."""
    tested = tested_versions()
    cpu = cpu_description()
    if gpu:
        cpu["torch_kernels"] = torch_cpu_kernels()
    return {
        "qtune": installed_version("qtune") or "source",
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu,
        "gpu": gpu_description() if gpu else None,
        "versions": {name: installed_version(name) for name in tested},
        "differs_from_tested": version_differences(tested),
    }


def environment_summary(env: dict) -> str:
    """The record in one sentence, for the report page and the model card."""
    versions = env.get("versions", {})
    core = ", ".join(
        f"{name} {versions[name]}"
        for name in ("torch", "transformers", "peft", "trl", "bitsandbytes")
        if versions.get(name)
    )
    cpu = env.get("cpu", {})
    gpu = env.get("gpu")
    device = f"{gpu['name']} x{gpu['count']}" if gpu else "no GPU"
    differs = env.get("differs_from_tested") or {}
    tested = (
        "the tested versions"
        if not differs
        else "differs from the tested set: "
        + ", ".join(f"{name} {d['installed']} (tested {d['tested']})" for name, d in differs.items())
    )
    kernels = f" (torch kernels {cpu['torch_kernels']})" if cpu.get("torch_kernels") else ""
    return (
        f"qtune {env.get('qtune')}, Python {env.get('python')}, {core}; {cpu.get('kind')}{kernels}, "
        f"{cpu.get('cores')} cores, {device}; {tested}"
    )


def describe_environment(env: dict) -> list[str]:
    """`qtune doctor`'s lines."""
    cpu, gpu = env["cpu"], env["gpu"]
    lines = [
        f"qtune {env['qtune']}, Python {env['python']} on {env['platform']}",
        f"CPU: {cpu['model']}, {cpu['cores']} cores for this process; {', '.join(cpu['features']) or 'no AVX2'}",
        f"CPU kind: {cpu['kind']}; torch's CPU kernels: {cpu.get('torch_kernels', 'not asked')} (figures in "
        "bench/README.md name the kind they were measured on)",
        "GPU: "
        + (
            f"{gpu['name']} x{gpu['count']}, {gpu['memory_gib']} GiB, compute capability {gpu['capability']}, CUDA "
            f"{gpu['cuda']}, bf16 {'yes' if gpu['bf16'] else 'no'}"
            if gpu
            else "none visible to torch (training runs on the CPU)"
        ),
        f"packages against the tested set ({TESTED_FILE.name}, in the qtune package):",
    ]
    tested = tested_versions()
    differs = env["differs_from_tested"]
    for name, version in tested.items():
        installed = env["versions"].get(name)
        state = "not installed" if installed is None else "DIFFERS" if name in differs else "ok"
        lines.append(f"  {name:<18} {installed or '-':<14} tested {version:<10} {state}")
    if differs:
        lines.append(
            f"{len(differs)} package(s) differ from the tested set: runs work, but figures may differ in the later "
            f"digits; `pip install -c {TESTED_FILE}` with the package names installs the tested versions"
        )
    else:
        lines.append("every installed package is at its tested version")
    return lines
