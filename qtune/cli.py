"""Command line: parse arguments, call the stage functions, turn user errors into one line."""

from __future__ import annotations

import argparse
import os
import sys

from qtune import distributed
from qtune.cuda_setup import use_expandable_segments
from qtune.errors import EXIT_PIPE_CLOSED, EXIT_RECIPE, QtuneError
from qtune.library_noise import quiet_library_noise
from qtune.recipe import EXPORT_FORMATS, MERGE_BASES, PUSH_TARGETS
from qtune.run_dir import check_run_folder
from qtune.tiny_models import FAMILIES

USAGE_EXAMPLES = """examples:
  qtune validate recipes/demo.yaml
  qtune train recipes/demo.yaml --set train.max_steps=50
  qtune train recipes/llama-7b-alpaca.yaml --resume
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # usage mistakes go through the same one-line path as the rest
        raise QtuneError(message, fix=f"see '{self.prog} --help'", code=EXIT_RECIPE)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qtune",
        description="QLoRA fine-tuning from a recipe.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    validate = commands.add_parser("validate", help="check a recipe (fast, loads nothing)")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    train = commands.add_parser("train", help="fine-tune with QLoRA")
    train.add_argument("recipe")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)",
    )
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
        help=f"{', '.join(EXPORT_FORMATS)} (repeatable)",
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

    memory = commands.add_parser("memory", help="weight memory per precision, from config.json alone")
    memory.add_argument("model", help="Hub id or local folder (only config.json is read)")
    memory.add_argument("--revision", default="main")
    memory.add_argument("--json", action="store_true", help="print JSON instead of the table")

    plan = commands.add_parser("plan", help="predicted peak training memory of a recipe, and whether it fits a GPU")
    plan.add_argument("recipe")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    plan.add_argument(
        "--gpu", help="t4, l4, a10g, rtx3090, rtx4090, a100-40gb, a100-80gb, h100, h200, or a size like 16GB"
    )
    plan.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32 compute; peak RSS, loading included)")

    evaluation = commands.add_parser("eval", help="loss and perplexity of the 4-bit base, the adapter and every export")
    evaluation.add_argument("run_dir")
    evaluation.add_argument("--data", help="a data file (default: the run's validation split)")
    evaluation.add_argument("--format", dest="data_format", help="format of --data (default: the recipe's first)")
    evaluation.add_argument("--samples", type=int, help="at most this many samples (default: all of them)")

    commands.add_parser("report", help="rebuild a run's report.html and print its path").add_argument("run_dir")
    report = commands.add_parser("quantize-report", help="every precision of one model: memory, load time, perplexity")
    report.add_argument("model", help="a local model folder")
    report.add_argument("--data", required=True, help="data file to measure perplexity on")
    report.add_argument("--format", dest="data_format", default="text")
    report.add_argument("--samples", type=int, default=64)
    report.add_argument("--max-length", type=int, default=512)
    report.add_argument("--out", help="folder for quantize_report/ (default: current folder)")

    for name, helptext in (
        ("generate", "one completion for --prompt (for scripts)"),
        ("chat", "talk to the model (stdin; /reset, /exit)"),
    ):
        command = commands.add_parser(name, help=helptext)
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
    return parser


def cmd_validate(args) -> int:
    from qtune.recipe import check_local_model, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_local_model(recipe)
    steps = f"{recipe.train.max_steps} steps" if recipe.train.max_steps else f"{recipe.train.epochs:g} epochs"
    lora = f"continuing the adapter {recipe.model.adapter}" if recipe.model.adapter else f"LoRA r={recipe.lora.r}"
    print(
        f"ok: {args.recipe}: {recipe.train.method} of {recipe.model.name} in {recipe.quant.type}, {lora}, "
        f"{len(recipe.data.datasets)} dataset(s), {steps} -> {recipe.train.output_dir}"
    )
    return 0


def cmd_train(args) -> int:
    from qtune.recipe import check_local_model, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # recipe mistakes surface before torch is imported
    check_local_model(recipe)
    if distributed.rank() == 0:
        check_run_folder(recipe.train.output_dir, resume=args.resume)  # and folder mistakes too
    quiet_library_noise()
    from qtune.pipeline import run

    run(recipe, resume=args.resume, overwrite=args.overwrite, force=args.force)
    return 0


def cmd_export(args) -> int:
    quiet_library_noise()
    from qtune.export.run import export

    export(
        args.run_dir,
        args.formats,
        out_dir=args.out,
        merge_base=args.merge_base,
        eval_data=args.eval_data,
        eval_format=args.eval_format,
        eval_samples=args.eval_samples,
    )
    return 0


def cmd_push(args) -> int:
    quiet_library_noise()
    from qtune.hub import push

    push(args.run_dir, args.repo, args.what or ["adapter"], private=not args.public)
    return 0


def cmd_memory(args) -> int:
    quiet_library_noise()
    from qtune.memory import memory_report, report_json

    report = memory_report(args.model, args.revision)
    print(report_json(report) if args.json else report["text"])
    return 0


def cmd_plan(args) -> int:
    import re

    from qtune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    quiet_library_noise()
    from qtune.plan import GPUS_GIB, context_table, describe_plan, plan_training

    gpu_gib = None
    if args.gpu:
        size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gb", args.gpu.lower())
        if args.gpu.lower() in GPUS_GIB:
            gpu_gib = GPUS_GIB[args.gpu.lower()]
        elif size:
            gpu_gib = float(size.group(1))
        else:
            raise QtuneError(
                f"unknown --gpu '{args.gpu}'",
                fix=f"use one of {', '.join(GPUS_GIB)} or a size like 16GB",
                code=EXIT_RECIPE,
            )
    if args.cpu and args.gpu:
        raise QtuneError("--cpu and --gpu together", fix="plan for one device", code=EXIT_RECIPE)
    compute_bytes = 4 if recipe.quant.compute_dtype == "fp32" or args.cpu else 2
    budget = None
    if args.cpu:
        import psutil

        budget = psutil.virtual_memory().available
    plan = plan_training(
        recipe, gpu_gib=gpu_gib, budget_bytes=budget, compute_bytes=compute_bytes, device="cpu" if args.cpu else "cuda"
    )
    print(describe_plan(plan, args.gpu or ("free RAM" if args.cpu else None)))
    if not args.cpu:
        print("\n".join(context_table(plan)))
    print(
        "note: an estimate. Checked on CPU against real runs (bench/plan_accuracy.py) and on a GPU at long context "
        "(+3.5%, bench/gpu_check.py); short rows without checkpointing measured 20% above it on a GPU (README)."
    )
    return 0


def cmd_eval(args) -> int:
    quiet_library_noise()
    from qtune.evaluate import eval_run

    eval_run(args.run_dir, data=args.data, data_format=args.data_format, samples=args.samples)
    return 0


def cmd_report(args) -> int:
    from qtune.report_page import build_report
    from qtune.run_dir import open_run

    print(build_report(open_run(args.run_dir).run_dir))
    return 0


def cmd_quantize_report(args) -> int:
    quiet_library_noise()
    from qtune.evaluate import quantize_report

    quantize_report(
        args.model,
        args.data,
        data_format=args.data_format,
        samples=args.samples,
        max_length=args.max_length,
        out_dir=args.out,
    )
    return 0


def cmd_generate(args) -> int:
    quiet_library_noise()
    from qtune.chat import build_prompt, generate, load_for_generation

    model, tokenizer, style = load_for_generation(args.run_dir, args.artifact)
    prompt = build_prompt(tokenizer, style, [{"role": "user", "content": args.prompt}], alpaca_input=args.input_text)
    reply = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(reply.text)
    return 0


def cmd_chat(args) -> int:
    quiet_library_noise()
    from qtune.chat import chat_loop, load_for_generation

    model, tokenizer, style = load_for_generation(args.run_dir, args.artifact)
    chat_loop(
        model, tokenizer, style, max_new_tokens=args.max_new_tokens, temperature=args.temperature, system=args.system
    )
    return 0


def cmd_make_tiny_model(args) -> int:
    quiet_library_noise()
    from pathlib import Path

    from qtune.tiny_models import write_demo_data, write_tiny_model

    target = Path(args.out_dir)
    if target.is_dir() and any(target.iterdir()) and not (target / "qtune-tiny.json").is_file():
        raise QtuneError(
            f"{target} is a non-empty folder that is not a qtune tiny model",
            fix="choose another folder",
            code=EXIT_RECIPE,
        )
    print(
        f"make-tiny-model: building a {args.family} tokenizer and model, then {args.pretrain_steps} pretraining steps "
        f"(about {args.pretrain_steps // 4 + 5} s on 2 free cores)",
        flush=True,
    )
    out = write_tiny_model(args.out_dir, args.family, seed=args.seed, pretrain_steps=args.pretrain_steps, progress=True)
    print(f"tiny {args.family} model written to {out} ({args.pretrain_steps} pretraining steps)")
    if args.demo_data:
        print(f"demo data written to {write_demo_data(args.demo_data, seed=args.seed)}")
    if args.preference_data:  # other prompts than the SFT data's: another seed
        written = write_demo_data(args.preference_data, count=1000, seed=args.seed + 1, preference=True)
        print(f"preference pairs written to {written}")
    return 0


COMMANDS = {
    "validate": cmd_validate,
    "train": cmd_train,
    "export": cmd_export,
    "push": cmd_push,
    "memory": cmd_memory,
    "plan": cmd_plan,
    "eval": cmd_eval,
    "report": cmd_report,
    "quantize-report": cmd_quantize_report,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "make-tiny-model": cmd_make_tiny_model,
}


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except QtuneError as error:
        if debug:
            raise
        print(f"qtune: error: {error.line()}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    import signal

    # A file-size limit (ulimit -f) otherwise kills the process mid-write with SIGXFSZ; ignored, the write fails
    # with EFBIG and is reported like a full disk, with the half-written file cleaned up.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    use_expandable_segments()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`qtune memory M --json | head -1`): nothing more to say, and Python would print a
        # traceback when it flushes stdout at exit, so stdout goes to /dev/null first. 141 is what a shell reports
        # for a command ended by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_PIPE_CLOSED
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
