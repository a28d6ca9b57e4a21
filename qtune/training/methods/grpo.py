"""GRPO (Shao et al. 2024) with verifiable rewards: for each prompt the model writes `num_generations` completions,
the recipe's rewards score them (an exact answer, a format, a length...), and each completion is pushed up or down by
its reward against its group's. trl's GRPOTrainer owns the loop: generation with the KV cache on the same 4-bit
weights as training (no second model), and its loss variants (Dr. GRPO, DAPO, GSPO's sequence-level ratios...).
The KL reference, when beta > 0, is the base with the adapter switched off."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from qtune.core.schema import Section
from qtune.core.text import fmt
from qtune.data.prompts import PROMPT_DATA
from qtune.training.methods import preference
from qtune.training.methods.method import TrainingMethod
from qtune.training.rewards import check_reward_spec

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo")


class RewardSpec(Section):
    """One reward of grpo.rewards: a built-in function or a user's own, and its weight."""

    function: str
    """exact_match, numeric, regex, length, contains, or `python: package.module:function` (runs your code)."""
    weight: float = 1.0
    """Its weight in the sum of rewards."""
    pattern: str | None = None
    """exact_match / numeric: the regex that takes the answer out of a completion (its first group); regex: the format
    the completion must match."""
    normalize: bool = True
    """exact_match: compare after normalisation (case, spaces, a trailing period, thousands separators); false:
    compare the stripped texts as they are."""
    tolerance: float = Field(1e-6, ge=0)
    """numeric: the largest difference that still counts as right."""
    target: int | None = Field(None, gt=0)
    """length: completion tokens before the penalty starts."""
    text: str | None = None
    """contains: the text the completion must contain."""


class GrpoSection(Section):
    """GRPO's settings (train.method: grpo)."""

    rewards: list[RewardSpec] = []
    """The rewards, each {function, weight, ...}: e.g. [{function: exact_match, pattern: '#### (.+)'}]."""
    reference_pattern: str | None = None
    """The regex that takes the reference answer out of the answer column (GSM8K: '#### (.+)'); none: all of it."""
    num_generations: int = Field(8, ge=2)
    """Completions per prompt: a group, whose rewards are compared with each other."""
    max_completion_length: int = Field(256, gt=0)
    """Tokens a completion may have (it counts against data.max_length with its prompt)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the completions."""
    beta: float = Field(0.0, ge=0)
    """KL penalty against the reference (the base, adapter off); 0, as current practice, computes no reference."""
    loss_type: Literal[LOSS_TYPES] = "dapo"
    """trl's loss: grpo, dr_grpo, dapo (trl's default), bnpo, cispo, sapo, luspo."""
    epsilon: float = Field(0.2, gt=0)
    """Clipping of the probability ratio."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: GRPO's ratios; sequence: GSPO's."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (group), the batch's (batch), or not (none: Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss (DAPO)."""
    use_vllm: bool = False
    """Generate with vLLM in trl's colocate mode (a CUDA GPU and `pip install vllm`): faster generation from vLLM's own
    16-bit copy of the weights, synced with the adapter every step, beside the 4-bit model training. Evaluation is
    then sampled as training is, not greedy."""
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1)
    """use_vllm: the share of the GPU's memory vLLM takes for its weights and KV cache (outside qtune's plan)."""
    completions_every: int = Field(50, ge=0)
    """Every this many steps (and at the first logged one), a prompt's sampled completions with their rewards go to
    the run's completions.jsonl and page; 0: none."""

    @field_validator("reference_pattern")
    @classmethod
    def _compiles(cls, value):
        import re

        if value is not None:
            re.compile(value)
        return value


def check_recipe(recipe) -> str | None:
    """What GRPO needs of the rest of the recipe: groups that divide the batch, room for the completion, rewards that
    can be built."""
    section = recipe.grpo
    if not section.rewards:
        return "train.method grpo needs grpo.rewards: e.g. [{function: exact_match}]"
    for spec in section.rewards:
        problem = check_reward_spec(spec)
        if problem:
            return problem
    batch = recipe.train.micro_batch_size * recipe.train.grad_accum
    if batch % section.num_generations:
        return (
            f"grpo.num_generations {section.num_generations} does not divide the {batch} completions of a step "
            f"(train.micro_batch_size {recipe.train.micro_batch_size} x grad_accum {recipe.train.grad_accum}): "
            "make their product a multiple of it"
        )
    if section.max_completion_length >= recipe.data.max_length:
        return (
            f"grpo.max_completion_length {section.max_completion_length} leaves no room for the prompt in "
            f"data.max_length {recipe.data.max_length}: raise data.max_length or lower max_completion_length"
        )
    return preference.never_trains_on_prompts(recipe)


ROWS_CHECKED = 4


def check_before_loading(recipe, data) -> None:
    """What GRPO checks once the data are read, before the model loads: vLLM where it is asked for, then every reward
    on real rows."""
    if recipe.grpo.use_vllm:
        vllm_problem()
    check_rewards_on_rows(recipe, data)


def vllm_problem() -> None:
    """An EnvironmentProblem (one line) when grpo.use_vllm cannot run here: no CUDA GPU, or no vllm package."""
    import importlib.util

    import torch

    from qtune.core.errors import EnvironmentProblem

    if not torch.cuda.is_available():
        raise EnvironmentProblem(
            "grpo.use_vllm needs a CUDA GPU; this machine has none",
            fix="set grpo.use_vllm: false (generation then runs in transformers, on the 4-bit weights)",
        )
    if importlib.util.find_spec("vllm") is None:
        raise EnvironmentProblem(
            "grpo.use_vllm needs the vllm package, which is not installed",
            fix="pip install vllm (a version trl supports), or set grpo.use_vllm: false",
        )


def check_rewards_on_rows(recipe, data) -> None:
    """Calls every reward on the first training rows, with each row's reference answer as the completion, before the
    model loads: an exception, a value that is not a number, or a wrong count is one line naming the reward and row."""
    import math

    from qtune.core.errors import DataError
    from qtune.training.rewards import build_reward

    section = recipe.grpo
    rows = list(data.train.take(ROWS_CHECKED))  # a Dataset's first rows, or a stream's (data.streaming)
    columns = {name: [row[name] for row in rows] for name in rows[0] if name != "prompt"}
    for spec in section.rewards:
        where = f"grpo.rewards: {spec.function}"
        try:
            reward = build_reward(spec, section.reference_pattern)
        except Exception as e:  # a user's module that does not import
            raise DataError(f"{where} cannot be loaded: {type(e).__name__}: {e}", fix="check the module") from None
        try:
            values = reward(
                prompts=[row["prompt"] for row in rows],
                completions=columns["answer"],
                completion_ids=columns["answer_ids"],
                **columns,
            )
        except Exception as e:
            raise DataError(
                f"{where} raised {type(e).__name__} on the first {len(rows)} training rows: {e}",
                fix="fix the reward (it gets prompts, completions, completion_ids and every data column)",
            ) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(rows):
            count = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise DataError(
                f"{where} returned {count} for {len(rows)} completions", fix="return one number per completion"
            )
        for index, value in enumerate(values):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise DataError(
                    f"{where} returned {value!r} for training row {index + 1}", fix="return a finite number (or None)"
                )


def generation_parts(recipe, shape, compute_bytes: int) -> tuple[int, int]:
    """(KV cache, log-probs) bytes: the KV cache while the step's completions are generated (every completion of the
    step at once: micro_batch_size x grad_accum sequences of up to max_length tokens, keys and values of every layer),
    and the completions' fp32 log-probs over the vocabulary when the micro-batch is scored (logits and log-softmax)."""
    sequences = recipe.train.micro_batch_size * recipe.train.grad_accum
    kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * compute_bytes * sequences * recipe.data.max_length
    logits = 2 * recipe.train.micro_batch_size * recipe.grpo.max_completion_length * shape.vocab * 4
    return kv_cache, logits


def generation_memory(recipe, shape, compute_bytes: int) -> dict[str, int]:
    """What GRPO holds besides the training step: the larger of generation_parts (they are not alive together)."""
    kv_cache, logits = generation_parts(recipe, shape, compute_bytes)
    if kv_cache >= logits:
        return {"generation_kv_cache": kv_cache}
    return {"completion_logits": logits}


def generation_limits(recipe, plans: dict) -> list[str]:
    """`qtune plan`'s GRPO table: per GPU (`plans`: its name -> the recipe's plan at its memory), the largest
    num_generations (at the recipe's prompts per step) and the largest max_completion_length (at its completions per
    step) that fit, everything else as the recipe has it. The plan is linear in both: the KV cache grows with the
    completions generated at once, the completions' log-probs with their length."""
    section, train = recipe.grpo, recipe.train
    prompts = train.micro_batch_size * train.grad_accum // section.num_generations
    lines = [
        f"  {'GPU':<12}{'num_generations':>17}{'max_completion_length':>23}   (largest that fit: num_generations at "
        f"{prompts} prompt(s) per step, max_completion_length at {section.num_generations} per prompt)"
    ]
    for name, plan in plans.items():
        kv_now, logits_now = generation_parts(recipe, plan["shape"], plan["compute_bytes"])
        kv_per_sequence = kv_now // (train.micro_batch_size * train.grad_accum)
        logits_per_token = logits_now // section.max_completion_length
        generation = plan["parts"].get("generation_kv_cache", 0) + plan["parts"].get("completion_logits", 0)
        free = plan["gpu_bytes"] - (plan["training_bytes"] - generation)
        generations = int(free // (kv_per_sequence * prompts)) if free >= logits_now else 0
        length = min(int(free // logits_per_token), recipe.data.max_length - 1) if free >= kv_now else 0
        cells = [f"{generations:,}" if generations >= 2 else "-", f"{length:,}" if length > 0 else "-"]
        lines.append(f"  {name:<12}{cells[0]:>17}{cells[1]:>23}")
    lines.append(
        "  -: does not fit at any value; max_completion_length is at most data.max_length - 1; activations kept as the "
        "plan keeps them for the recipe on that GPU"
        + ("; vLLM's share (grpo.vllm_gpu_memory) is not in these figures" if section.use_vllm else "")
    )
    return lines


def trainer_config():
    """trl's GRPOConfig."""
    from trl import GRPOConfig

    return GRPOConfig


def trainer_settings(recipe) -> dict:
    """GRPOConfig's fields from the grpo section: one generation round per optimizer step (the step's completions are
    generated when it starts, so a resume at a step boundary regenerates exactly), no dropout, one greedy answer per
    validation prompt (qtune's trainer generates greedily while evaluating)."""
    section = recipe.grpo
    return {
        "disable_dropout": True,
        "remove_unused_columns": False,
        "num_generations": section.num_generations,
        "num_generations_eval": 1,
        "max_completion_length": section.max_completion_length,
        "temperature": section.temperature,
        "top_p": section.top_p,
        "beta": section.beta,
        "loss_type": section.loss_type,
        "epsilon": section.epsilon,
        "importance_sampling_level": section.importance_sampling_level,
        "scale_rewards": section.scale_rewards,
        "mask_truncated_completions": section.mask_truncated_completions,
        "reward_weights": [spec.weight for spec in section.rewards],
        "steps_per_generation": recipe.train.grad_accum,
        "log_completions": False,
        **(
            {
                "use_vllm": True,
                "vllm_mode": "colocate",
                "vllm_gpu_memory_utilization": section.vllm_gpu_memory,
                "vllm_max_model_length": recipe.data.max_length,
            }
            if section.use_vllm
            else {}
        ),
    }


def trainer():
    """qtune's GRPO trainer."""
    from qtune.training.methods.grpo_trainer import QtuneGRPOTrainer

    return QtuneGRPOTrainer


def trainer_options(recipe, tokenizer, continues_adapter) -> dict:
    """The reward functions, built from the recipe (a user's own imported now), and how often completions are kept."""
    from qtune.training.rewards import build_reward

    section = recipe.grpo
    return {
        "reward_funcs": [build_reward(spec, section.reference_pattern) for spec in section.rewards],
        "completions_every": section.completions_every,
    }


def describe_setup(recipe) -> str:
    """The line said before training: groups, rewards, reference."""
    section = recipe.grpo
    rewards = ", ".join(f"{spec.function} x {spec.weight:g}" for spec in section.rewards)
    reference = "the base with the adapter switched off" if section.beta > 0 else "none (beta 0)"
    generation = (
        f"; generated by vLLM (colocate, {section.vllm_gpu_memory:.0%} of the GPU besides the plan)"
        if section.use_vllm
        else ""
    )
    return (
        f"train: grpo, {section.num_generations} completions per prompt of up to {section.max_completion_length} "
        f"tokens, rewards: {rewards}; KL reference: {reference}{generation}"
    )


GRPO_METRICS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "groups_all_equal",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "completions_clipped",
    "kl": "kl",
}


def metrics(history: list[dict], before: dict, final_eval: dict) -> dict:
    """Mean reward and its std, per function, the share of groups whose rewards are all equal (they teach nothing),
    completion lengths and the KL: from the first and the last logged training steps."""
    logged = [h for h in history if "reward" in h and "loss" in h]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    out = {}
    for name, key in GRPO_METRICS.items():
        out[f"train_{key}_first"] = first.get(name)
        out[f"train_{key}"] = last.get(name)
    for name in last:
        if name.startswith("rewards/") and name.endswith("/mean"):
            out[f"train_reward_{name.split('/')[1]}"] = last[name]
    out["reward_curve"] = [(h.get("step"), h["reward"]) for h in logged]
    # generation's cost, over every logged step: seconds per step (one generation round each) and tokens per second
    for name in ("generation_seconds", "generation_tokens_per_second"):
        values = [h[name] for h in logged if h.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    # the greedy answers to the validation prompts, at step 0 and at the end: the reward, and each function's (an
    # exact_match reward's mean is the share of exact answers)
    for values, suffix in ((before, "_before"), (final_eval, "")):
        out[f"eval_reward{suffix}"] = values.get(f"eval_reward{suffix}")
        for key, value in values.items():
            name = key.removesuffix(suffix)
            if name.startswith("eval_rewards/") and name.endswith("/mean"):
                out[f"eval_reward_{name.split('/')[1]}{suffix}"] = value
    return out


def result_rows(metrics: dict) -> list[tuple[str, str]]:
    """The mean reward and the share of all-equal groups, first logged step -> last; the greedy answers' reward (and
    exact answers) on the validation prompts, before training -> after."""
    rows = [
        (
            "mean reward, first -> last logged step",
            f"{fmt(metrics.get('train_reward_first'))} -> {fmt(metrics.get('train_reward'))}",
        ),
        (
            "groups whose rewards are all equal, first -> last",
            f"{fmt(metrics.get('train_groups_all_equal_first'), '.2f')} -> "
            f"{fmt(metrics.get('train_groups_all_equal'), '.2f')}",
        ),
    ]
    if metrics.get("eval_reward") is not None:
        rows.append(
            (
                "greedy answers' mean reward on the validation prompts, before -> after",
                f"{fmt(metrics.get('eval_reward_before'), '.3f')} -> {fmt(metrics.get('eval_reward'), '.3f')}",
            )
        )
    if metrics.get("eval_reward_exact_match") is not None:
        rows.append(
            (
                "exact answers (greedy) on the validation prompts, before -> after",
                f"{fmt(metrics.get('eval_reward_exact_match_before'), '.3f')} -> "
                f"{fmt(metrics.get('eval_reward_exact_match'), '.3f')}",
            )
        )
    return rows


def card_description(recipe) -> str:
    """GRPO, its groups, loss and rewards."""
    section = recipe.grpo
    rewards = ", ".join(spec.function for spec in section.rewards)
    return (
        f"GRPO with verifiable rewards ({rewards}; {section.num_generations} completions per prompt, loss "
        f"{section.loss_type}, beta {section.beta:g}){preference.continues(recipe)}"
    )


GRPO = TrainingMethod(
    name="grpo",
    summary="group relative policy optimization with verifiable rewards (exact answers, formats, lengths): the model "
    "writes several completions per prompt and learns from their rewards; prompts with reference answers",
    section=GrpoSection,
    data=PROMPT_DATA,
    check_recipe=check_recipe,
    check_data=check_before_loading,
    lora_dropout=False,
    trainer_config=trainer_config,
    trainer_settings=trainer_settings,
    trainer=trainer,
    trainer_options=trainer_options,
    describe_setup=describe_setup,
    # a micro-batch's completions with their prompts, each up to max_length
    sequences_in_flight=lambda recipe: recipe.train.micro_batch_size,
    extra_memory=generation_memory,
    plan_table=generation_limits,
    in_flight="completions: the micro-batch's {sequences} prompts with completions of up to {tokens} tokens at a time",
    language_model_loss=False,
    metrics=metrics,
    result_rows=result_rows,
    card_description=card_description,
)
