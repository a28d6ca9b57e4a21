"""GRPO on the 4-bit base: trl's GRPOTrainer, generating with the model it trains (the KV cache, the same 4-bit
weights), on prompts qtune rendered and tokenized."""

from __future__ import annotations

from trl import GRPOTrainer

from qtune.training.methods.base_trainer import QtuneTrainerMixin, exact_trainable_values


class QtuneGRPOTrainer(QtuneTrainerMixin, GRPOTrainer):
    """trl's GRPOTrainer on prompts qtune rendered: each prompt's tokens are qtune's (qtune.data.prompts)."""

    def __init__(self, *args, **kwargs):
        with exact_trainable_values(kwargs["model"], lambda: self.model):
            super().__init__(*args, **kwargs)
        self.prompt_tokens = {}
        for split in (self.train_dataset, self.eval_dataset):
            if split is not None:
                self.prompt_tokens.update(zip(split["prompt"], split["prompt_ids"]))

    def _tokenize_prompts(self, prompts: list):
        """The prompts' tokens as qtune.data.prompts made them (a chat prompt's rendering has its own special tokens;
        trl would add the tokenizer's again)."""
        if all(prompt in self.prompt_tokens for prompt in prompts):
            return [list(self.prompt_tokens[prompt]) for prompt in prompts], None, {}
        return super()._tokenize_prompts(prompts)

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
