"""The baseline: QLoRA fine-tuning as the Hugging Face guides write it, nothing from qtune in the loop.

BitsAndBytesConfig (NF4, double quant) -> prepare_model_for_kbit_training -> get_peft_model -> trl's
SFTTrainer with its defaults (dynamic padding to the longest sample of each batch, gradient checkpointing
as trl sets it, its fused LM head) and paged_adamw_8bit. bench/throughput.py runs it against `qtune
train` with the same model, data, LoRA shape, sequence cap, batch, steps and schedule.

The data is handed over already tokenized (input_ids + completion_mask, made by qtune's data stage) so
both sides train on identical tokens and supervise identical positions; SFTTrainer takes that form.

    python bench/hf_baseline.py SETTINGS.json   (written by bench/throughput.py)

Prints one JSON line: step seconds, tokens, peak RSS / CUDA memory, final eval loss.
"""

import json
import resource
import sys
import time

import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps only (not loading, not evaluation)."""

    def __init__(self):
        self.seconds, self.started = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.started)


def qlora_model(path: str, lora: dict, compute_dtype, on_gpu: bool):
    """The guides' QLoRA model: NF4 with double quantization, prepare_model_for_kbit_training, LoRA on all linear
    layers (`lora`: r, alpha, dropout)."""
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        ),
        dtype=compute_dtype,
        device_map={"": 0} if on_gpu else None,
    )
    model = prepare_model_for_kbit_training(model)
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def main():
    settings = json.loads(open(sys.argv[1]).read())
    on_gpu = torch.cuda.is_available()
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    set_seed(settings["seed"])

    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    model = qlora_model(settings["model"], settings["lora"], compute_dtype, on_gpu)

    config = SFTConfig(
        output_dir=settings["output_dir"],
        per_device_train_batch_size=settings["micro_batch_size"],
        per_device_eval_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["grad_accum"],
        max_steps=settings["steps"],
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=settings["warmup_ratio"],
        max_grad_norm=0.3,
        optim="paged_adamw_8bit",
        max_length=settings["max_length"],
        seed=settings["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=on_gpu,
        use_cpu=not on_gpu,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_from_disk(settings["train_tokenized"]),
        eval_dataset=load_from_disk(settings["val_tokenized"]),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    # the longest-context search measures the training step only (its eval would keep full logits for the row)
    evaluation = trainer.evaluate() if settings.get("evaluate", True) else {"eval_loss": None}
    print(
        json.dumps(
            {
                "step_seconds": timer.seconds,
                "non_padding_tokens": int(trainer.state.num_input_tokens_seen),
                "eval_loss": evaluation["eval_loss"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_cuda_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
                "gradient_checkpointing": bool(config.gradient_checkpointing),
            }
        )
    )


if __name__ == "__main__":
    main()
