"""The command line's arguments: one subcommand per stage, each with its options and help."""

from __future__ import annotations

import argparse

from qtune.config.recipe import MERGE_BASES
from qtune.core.errors import EXIT_RECIPE, QtuneError
from qtune.demo.tiny_models import FAMILIES
from qtune.export.formats import FORMAT_NAMES, PUSH_TARGETS
from qtune.publish.chat import CHAT_COMMANDS

USAGE_EXAMPLES = """examples:
  qtune validate recipes/demo.yaml
  qtune train recipes/demo.yaml --set train.max_steps=50
  qtune train recipes/llama-7b-alpaca.yaml --resume
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage mistakes raised as a QtuneError (one line, exit 2) like every other mistake."""

    def error(self, message):  # usage mistakes go through the same one-line path as the rest
        """Raises the usage mistake as a QtuneError (exit 2) instead of printing usage."""
        raise QtuneError(message, fix=f"see '{self.prog} --help'", code=EXIT_RECIPE)


def positive(text: str) -> int:
    """An argument that must be a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def add_overrides(command: argparse.ArgumentParser) -> None:
    """--set, for every command that reads a recipe."""
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `qtune` command line: one subcommand per stage."""
    parser = ArgumentParser(
        prog="qtune",
        description="QLoRA fine-tuning from a recipe.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    validate = commands.add_parser(
        "validate", help="check a recipe, the folders it names and its data files (fast, loads no model)"
    )
    validate.add_argument("recipe")
    add_overrides(validate)

    train = commands.add_parser("train", help="fine-tune with QLoRA")
    train.add_argument("recipe")
    add_overrides(train)
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in train.output_dir"
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept a recipe whose training settings differ from the run's recipe.yaml",
    )
    train.add_argument("--overwrite", action="store_true", help="delete an existing train.output_dir and start over")

    export = commands.add_parser("export", help="merged fp16/bf16, re-quantized NF4 and GGUF files, each measured")
    export.add_argument("run_dir")
    export.add_argument(
        "--format",
        dest="formats",
        action="append",
        default=[],
        metavar="FORMAT",
        help=f"{', '.join(FORMAT_NAMES)} (repeatable)",
    )
    export.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    export.add_argument(
        "--merge-base",
        choices=MERGE_BASES,
        default="dequantized",
        help="merge into the dequantized NF4 weights the adapter was trained on (default, exact) "
        "or into the original weights",
    )
    export.add_argument("--eval-data", help="data file for the fidelity report (default: the run's validation set)")
    export.add_argument("--eval-format", help="format of --eval-data (default: the recipe's first dataset format)")
    export.add_argument("--eval-samples", type=int, default=32, help="samples compared per artifact (default 32)")
    add_overrides(export)  # the export section only (export.gptq.group_size=64): the run's recipe.yaml is unchanged

    push = commands.add_parser("push", help="upload a run (adapter and/or exports) with a model card to the Hub")
    push.add_argument("run_dir")
    push.add_argument("--repo", required=True, help="user/name")
    push.add_argument(
        "--what",
        action="append",
        default=[],
        choices=PUSH_TARGETS,
        help="what to upload (repeatable; default: adapter)",
    )
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")

    doctor = commands.add_parser(
        "doctor", help="versions, CPU and GPU, and how they differ from the versions qtune is tested with"
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of the lines")

    memory = commands.add_parser("memory", help="weight memory per precision, from config.json alone")
    memory.add_argument("model", help="Hub id or local folder (only config.json is read)")
    memory.add_argument("--revision", default="main")
    memory.add_argument("--json", action="store_true", help="print JSON instead of the table")

    plan = commands.add_parser("plan", help="predicted peak training memory of a recipe, and whether it fits a GPU")
    plan.add_argument("recipe")
    add_overrides(plan)
    plan.add_argument(
        "--gpu", help="t4, l4, a10g, rtx3090, rtx4090, a100-40gb, a100-80gb, h100, h200, or a size like 16GB"
    )
    plan.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32 compute; peak RSS, loading included)")

    evaluation = commands.add_parser(
        "eval", help="loss, or with --tasks benchmark scores, of the 4-bit base, the adapter and every export"
    )
    evaluation.add_argument("run_dir")
    evaluation.add_argument("--data", help="a data file (default: the run's validation split)")
    evaluation.add_argument("--format", dest="data_format", help="format of --data (default: the recipe's first)")
    evaluation.add_argument("--samples", type=int, help="at most this many samples (default: all of them)")
    evaluation.add_argument(
        "--tasks",
        type=lambda text: [t for t in text.split(",") if t],
        help="lm-evaluation-harness tasks instead of the loss: names (hellaswag,arc_easy,mmlu) or task YAML paths, "
        "comma-separated (needs pip install 'qtune[eval]')",
    )
    evaluation.add_argument("--limit", type=positive, help="with --tasks: at most N docs per task (quick runs)")
    evaluation.add_argument(
        "--num-fewshot", type=int, help="with --tasks: examples in each prompt (default: the task's)"
    )
    evaluation.add_argument(
        "--batch-size", default="8", help="with --tasks: requests per forward pass for transformers models (or 'auto')"
    )

    commands.add_parser("report", help="rebuild a run's report.html and print its path").add_argument("run_dir")
    report = commands.add_parser("quantize-report", help="every precision of one model: memory, load time, perplexity")
    report.add_argument("model", help="a local model folder")
    report.add_argument("--data", required=True, help="data file to measure perplexity on")
    report.add_argument("--format", dest="data_format", default="text")
    report.add_argument("--samples", type=int, default=64)
    report.add_argument("--max-length", type=int, default=512)
    report.add_argument("--out", help="folder for quantize_report/ (default: current folder)")

    chat_commands = "\n".join(f"  {name:<14}{what}" for name, what in CHAT_COMMANDS.items())
    for name, helptext, epilog in (
        ("generate", "one completion for --prompt (for scripts)", None),
        (
            "chat",
            "talk to the model (stdin, a terminal or a pipe; /help lists the commands)",
            f'commands (typed as a line, on a terminal or piped; "//text" sends "/text"):\n{chat_commands}',
        ),
    ):
        command = commands.add_parser(
            name,
            help=helptext,
            description=helptext,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("run_dir")
        if name == "generate":
            command.add_argument("--prompt", required=True, help="the instruction (alpaca runs) or the user message")
            command.add_argument(
                "--input",
                dest="input_text",
                default="",
                help="alpaca runs: the input the instruction works on (the '### Input:' section)",
            )
        else:
            command.add_argument("--system", help="system message for chat-format runs")
        command.add_argument(
            "--artifact", help="an export to use instead of the adapter: a merged/nf4 folder or a .gguf"
        )
        command.add_argument("--max-new-tokens", type=int, default=128)
        command.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")

    tiny = commands.add_parser(
        "make-tiny-model", help="build a small model + tokenizer locally and pretrain it briefly (demo, tests)"
    )
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", choices=list(FAMILIES), default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--pretrain-steps",
        type=int,
        default=200,
        help="full-precision language-model steps on generated text, so the base is not random (0: skip)",
    )
    tiny.add_argument("--demo-data", metavar="FILE", help="also write the demo's alpaca-format dataset here")
    tiny.add_argument("--preference-data", metavar="FILE", help="also write DPO / ORPO pairs on the demo's tasks")
    tiny.add_argument("--grpo-data", metavar="FILE", help="also write GRPO's prompts with answers on the demo's tasks")
    tiny.add_argument(
        "--demo-task",
        metavar="FOLDER",
        help="also write a multiple-choice task on the demo's rules for 'qtune eval --tasks' (a YAML and its rows)",
    )
    return parser
