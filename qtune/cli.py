"""Command line: parse arguments, call the stage functions, turn user errors into one line."""

from __future__ import annotations

import os
import sys

from qtune import distributed
from qtune.cli_parser import build_parser
from qtune.cuda_setup import use_expandable_segments
from qtune.errors import EXIT_PIPE_CLOSED, EXIT_RECIPE, QtuneError
from qtune.library_noise import quiet_library_noise
from qtune.run_dir import check_run_folder


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
    if args.tasks is not None:
        if args.data or args.samples:
            raise QtuneError(
                "--data and --samples measure the loss; --tasks runs benchmarks", fix="use one or the other"
            )
        if not args.tasks:
            raise QtuneError("--tasks names no task", fix="e.g. --tasks arc_easy or --tasks my_task.yaml")
        from qtune.task_eval import eval_tasks

        batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        if not isinstance(batch_size, int) and not batch_size.startswith("auto"):
            raise QtuneError(f"--batch-size {batch_size}: not a number", fix="give a number, or auto")
        eval_tasks(args.run_dir, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=batch_size)
        return 0
    from qtune.evaluate import eval_run

    eval_run(args.run_dir, data=args.data, data_format=args.data_format, samples=args.samples)
    return 0


def cmd_report(args) -> int:
    quiet_library_noise()
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

    from qtune.demo_task import write_choice_task
    from qtune.tiny_models import write_demo_data, write_tiny_model

    target = Path(args.out_dir)
    if target.is_dir() and any(target.iterdir()) and not (target / "qtune-tiny.json").is_file():
        raise QtuneError(
            f"{target} is a non-empty folder that is not a qtune tiny model",
            fix="choose another folder",
            code=EXIT_RECIPE,
        )
    if args.demo_task:  # first: a folder it refuses stops the command before the minute of pretraining
        # prompts of a third seed: not the ones the demo trains on
        print(f"multiple-choice task written to {write_choice_task(args.demo_task, seed=args.seed + 2)}")
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
