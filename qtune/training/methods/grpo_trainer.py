"""GRPO on the 4-bit base: trl's GRPOTrainer, generating with the model it trains (the KV cache, the same 4-bit
weights), on prompts qtune rendered and tokenized."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from trl import GRPOTrainer

from qtune.core.folders import COMPLETIONS
from qtune.training.methods.base_trainer import QtuneTrainerMixin, exact_trainable_values
from qtune.training.rewards.builtin import completion_text

SHOWN = 4  # completions kept per step: the first prompt's first ones
TEXT_KEPT = 2000  # characters of a prompt (its end) or a completion kept


def keep_completions(logs: dict, group: int, step: int, reference, path: Path) -> None:
    """Appends the first prompt of trl's logged generations, its reference answer, its first SHOWN completions (of
    its `group`, which come first), their rewards per function and advantages to `path` as one JSON line."""
    shown = min(SHOWN, group)  # a group smaller than SHOWN: the next completions answer another prompt
    completions, advantages = list(logs["completion"])[:shown], list(logs["advantages"])[:shown]
    # a reward that returned None is NaN in trl's logs: null in JSON
    rewards = {
        name: [v if math.isfinite(v) else None for v in list(values)[:shown]]
        for name, values in logs["rewards"].items()
    }
    entry = {
        "step": step,
        "prompt": str(logs["prompt"][0])[-TEXT_KEPT:],
        "reference": None if reference is None else str(reference)[:TEXT_KEPT],
        "completions": [
            {
                "text": completion_text(text)[:TEXT_KEPT],
                "rewards": {name: values[i] for name, values in rewards.items()},
                "advantage": advantages[i] if i < len(advantages) else None,
            }
            for i, text in enumerate(completions)
        ],
    }
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


class QtuneGRPOTrainer(QtuneTrainerMixin, GRPOTrainer):
    """trl's GRPOTrainer on prompts qtune rendered: each prompt's tokens are qtune's (qtune.data.prompts), carried
    with the batch."""

    def __init__(self, *args, completions_every: int = 0, **kwargs):
        with exact_trainable_values(kwargs["model"], lambda: self.model):
            super().__init__(*args, **kwargs)
        self.batch_prompt_ids = None
        self.completions_every = completions_every
        self.completions_kept_at = None  # the step whose completions were kept last
        self.eval_sums = {}  # metric -> (sum, count) over the evaluation's answers so far
        self.first_reference = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """trl's rewards; while evaluating, also summed over every validation answer (trl logs the mean of its batches'
        means, which is not the share answered right when the batches differ in size)."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self.model.training:
            import torch

            scorable = ~torch.isnan(rewards_per_func).all(dim=1)
            weighted = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
            columns = {"reward": weighted[scorable]}
            for index, name in enumerate(self.reward_func_names):
                column = rewards_per_func[:, index]
                columns[f"rewards/{name}/mean"] = column[~torch.isnan(column)]
            for key, values in columns.items():
                total, count = self.eval_sums.get(key, (0.0, 0))
                self.eval_sums[key] = (total + values.sum().item(), count + values.numel())
        return rewards_per_func

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """trl's logging, with the evaluation's rewards as means over every validation answer; at the first logged
        training step and then once every completions_every steps, the first prompt of the step's generations with
        its completions and their rewards appended to the run's completions.jsonl (the run's page shows them)."""
        training = self.model.training
        if not training and self.eval_sums:
            for key, (total, count) in self.eval_sums.items():
                self._metrics["eval"][key] = [total / count] if count else []
            self.eval_sums = {}
        super().log(logs, start_time)
        step, every = self.state.global_step, self.completions_every
        if not (training and every and self._logs["prompt"] and self.accelerator.is_main_process):
            return
        if self.completions_kept_at is not None and step // every == self.completions_kept_at // every:
            return
        self.completions_kept_at = step
        path = Path(self.args.output_dir).parent / COMPLETIONS
        keep_completions(self._logs, self.num_generations, step, self.first_reference, path)

    def _generate_and_score_completions(self, inputs):
        """trl's generation and scoring, with the batch's prompt tokens at hand for _tokenize_prompts."""
        self.batch_prompt_ids = [list(row["prompt_ids"]) for row in inputs]
        if self.model.training:  # the reference answer of the step's first prompt, for completions.jsonl
            self.first_reference = inputs[0].get("answer")
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self.batch_prompt_ids = None

    def _track_num_input_tokens(self, inputs):
        """Nothing: the Trainer counts a batch's input_ids, which GRPO's prompt rows have not (it warned at every step);
        trl counts the prompts and completions once they are generated."""

    def _tokenize_prompts(self, prompts: list):
        """The batch's prompt tokens as qtune.data.prompts made them (a chat prompt's rendering has its own special
        tokens; trl would add the tokenizer's again)."""
        if self.batch_prompt_ids is None or len(self.batch_prompt_ids) != len(prompts):
            raise RuntimeError("qtune's GRPO trainer generates only for batches of its own prompt rows (prompt_ids)")
        return self.batch_prompt_ids, None, {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """trl's generation: sampled while training, greedy while evaluating (one answer per validation prompt, the one
        a user would get, so eval_reward is the share answered right). vLLM keeps its own sampling."""
        if self.model.training:  # timed: generation's share of a step, its tokens per second (metrics.json)
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
            seconds = time.perf_counter() - started  # the ids are Python lists: the device has finished
            self._metrics["train"]["generation_seconds"].append(seconds)
            self._metrics["train"]["generation_tokens_per_second"].append(sum(map(len, completion_ids)) / seconds)
            return completion_ids, logprobs
        if self.use_vllm:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        from transformers import GenerationConfig

        sampled = self.generation_config, self.generation_kwargs
        greedy = dict(self.generation_kwargs, do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
        self.generation_config, self.generation_kwargs = GenerationConfig(**greedy, disable_compile=True), greedy
        try:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        finally:
            self.generation_config, self.generation_kwargs = sampled

    def training_step(self, model, inputs, num_items_in_batch=None):
        """qtune's step (NaN counting, offloading, the tests' trace of the prompts trained on)."""
        if self.step_trace is not None and isinstance(inputs, list):
            tracer, self.step_trace = self.step_trace, None
            try:
                import zlib

                import torch

                # the prompts of the step, as numbers the same in every process (the tests compare them)
                tracer(self.state.global_step, torch.tensor([[zlib.crc32(row["prompt"].encode())] for row in inputs]))
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self.step_trace = tracer
        return super().training_step(model, inputs, num_items_in_batch)

    def create_model_card(self, *args, **kwargs):
        """Nothing: trl writes one per save; qtune writes the card it pushes."""
        pass

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """trl's GRPO loss (the NaN injection of the tests on top)."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self.with_injected_nan(model, result, return_outputs)
