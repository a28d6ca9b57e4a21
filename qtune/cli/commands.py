"""The commands: each turns its parsed arguments into stage calls and prints what the command answers. No logic of
its own beyond choosing those calls; a user's mistake is a QtuneError, printed as one line by qtune.cli.main."""

from __future__ import annotations

from qtune.core import distributed
from qtune.core.errors import EXIT_RECIPE, QtuneError
from qtune.core.folders import check_run_folder
from qtune.core.noise import quiet_library_noise


def cmd_validate(args) -> int:
    """`qtune validate`: checks a recipe, the paths it names and its data files without loading anything heavy,
    says what it checked and what it skipped, and what it would train."""
    from qtune.config.preflight import preflight
    from qtune.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    checked, skipped = preflight(recipe)
    for line in checked:
        print(f"checked: {line}")
    for line in skipped:
        print(f"skipped: {line}")
    steps = f"{recipe.train.max_steps} steps" if recipe.train.max_steps else f"{recipe.train.epochs:g} epochs"
    lora = f"continuing the adapter {recipe.model.adapter}" if recipe.model.adapter else f"LoRA r={recipe.lora.r}"
    print(
        f"ok: {args.recipe}: {recipe.train.method} of {recipe.model.name} in {recipe.quant.type}, {lora}, "
        f"{len(recipe.data.datasets)} dataset(s), {steps} -> {recipe.train.output_dir}"
    )
    return 0


def cmd_train(args) -> int:
    """`qtune train`: recipe, path and output-folder mistakes are found before torch is imported; then the
    pipeline."""
    from qtune.config.preflight import check_local_model, check_local_paths
    from qtune.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # recipe mistakes surface before torch is imported
    check_local_paths(recipe)  # and a typo'd folder before the run folder is claimed
    check_local_model(recipe)
    if distributed.rank() == 0:
        check_run_folder(recipe.train.output_dir, resume=args.resume)  # and folder mistakes too
    quiet_library_noise()
    from qtune.pipeline import run

    run(recipe, resume=args.resume, overwrite=args.overwrite, force=args.force)
    return 0


def cmd_doctor(args) -> int:
    """`qtune doctor`: the versions, CPU and GPU, and how they differ from the tested set."""
    import json

    from qtune.core.environment import describe_environment, environment

    env = environment()
    print(json.dumps(env, indent=2) if args.json else "\n".join(describe_environment(env)))
    return 0


def cmd_export(args) -> int:
    """`qtune export`: the requested formats, each measured and gated."""
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
        overrides=args.overrides,
    )
    return 0


def cmd_push(args) -> int:
    """`qtune push`: the chosen artifacts and a model card, in one commit."""
    quiet_library_noise()
    from qtune.publish.hub import push

    push(args.run_dir, args.repo, args.what or ["adapter"], private=not args.public)
    return 0


def cmd_memory(args) -> int:
    """`qtune memory`: weights per precision from config.json alone (a table, or JSON)."""
    quiet_library_noise()
    from qtune.planning.memory import memory_report, report_json

    report = memory_report(args.model, args.revision)
    print(report_json(report) if args.json else report["text"])
    return 0


def cmd_plan(args) -> int:
    """`qtune plan`: the predicted peak training memory of a recipe, for a GPU or this CPU."""
    import re

    from qtune.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    quiet_library_noise()
    from qtune.planning.plan import GPUS_GIB, context_table, describe_plan, plan_training

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
    if any(name.startswith("gptq_") for name in recipe.export.formats):
        from qtune.export.formats.gptq import describe_export_peak
        from qtune.modeling.config import load_config
        from qtune.planning.memory import inventory

        model = recipe.model
        config = load_config(model.name, model.revision, trust_remote_code=model.trust_remote_code)
        print(describe_export_peak(config, recipe.export.gptq, inventory(config).total))
    if not args.cpu:
        print("\n".join(context_table(plan)))
        from qtune.training.methods import method_of

        plans = {
            name: plan_training(recipe, gpu_gib=gib, compute_bytes=compute_bytes) for name, gib in GPUS_GIB.items()
        }
        method_lines = method_of(recipe).plan_table(recipe, plans)
        if method_lines:
            print("\n".join(method_lines))
    print(
        'note: an estimate, checked against real runs on CPU and on a GPU (bench/README.md, "Memory plan"): short '
        "rows without checkpointing measured 20% above it on a GPU."
    )
    return 0


def cmd_eval(args) -> int:
    """`qtune eval`: the loss table, or with --tasks benchmark scores; then the run's page is rebuilt."""
    quiet_library_noise()
    if args.tasks is not None:
        if args.data or args.samples:
            raise QtuneError(
                "--data and --samples measure the loss; --tasks runs benchmarks", fix="use one or the other"
            )
        if not args.tasks:
            raise QtuneError("--tasks names no task", fix="e.g. --tasks arc_easy or --tasks my_task.yaml")
        from qtune.evaluation.tasks.run import eval_tasks

        batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        if not isinstance(batch_size, int) and not batch_size.startswith("auto"):
            raise QtuneError(f"--batch-size {batch_size}: not a number", fix="give a number, or auto")
        eval_tasks(args.run_dir, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=batch_size)
    else:
        from qtune.evaluation.model_losses import eval_run

        eval_run(args.run_dir, data=args.data, data_format=args.data_format, samples=args.samples)
    from qtune.publish.report_page import build_report

    print(f"run page updated: {build_report(args.run_dir)}")
    return 0


def cmd_report(args) -> int:
    """`qtune report`: rebuilds the run's page and prints its path."""
    quiet_library_noise()
    from qtune.config.runs import open_run
    from qtune.publish.report_page import build_report

    print(build_report(open_run(args.run_dir).run_dir))
    return 0


def cmd_quantize_report(args) -> int:
    """`qtune quantize-report`: one model in every precision side by side."""
    quiet_library_noise()
    from qtune.evaluation.quantize_report import quantize_report

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
    """`qtune generate`: one answer to --prompt, written the way the run trained."""
    quiet_library_noise()
    from qtune.modeling.generation import generate
    from qtune.publish.chat import build_prompt, load_for_generation

    model, tokenizer, style = load_for_generation(args.run_dir, args.artifact)
    prompt = build_prompt(tokenizer, style, [{"role": "user", "content": args.prompt}], alpaca_input=args.input_text)
    reply = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(reply.text)
    return 0


def cmd_chat(args) -> int:
    """`qtune chat`: an interactive chat on the adapter or an export."""
    quiet_library_noise()
    from qtune.publish.chat import chat_loop, load_for_generation

    model, tokenizer, style = load_for_generation(args.run_dir, args.artifact)
    chat_loop(
        model, tokenizer, style, max_new_tokens=args.max_new_tokens, temperature=args.temperature, system=args.system
    )
    return 0


def cmd_make_tiny_model(args) -> int:
    """`qtune make-tiny-model`: the demo's model and tokenizer, and its data, pairs and task if asked."""
    quiet_library_noise()
    from pathlib import Path

    from qtune.demo.task import write_choice_task
    from qtune.demo.tiny_models import write_demo_data, write_tiny_model

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
    if args.grpo_data:  # prompts of a fourth seed (the task's is the third)
        written = write_demo_data(args.grpo_data, count=1000, seed=args.seed + 3, prompt_answer=True)
        print(f"prompts with answers written to {written}")
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
    "doctor": cmd_doctor,
}
