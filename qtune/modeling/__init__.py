"""The model: its config (config), dtypes and 4-bit quantization (precision), loading the 4-bit base, the tokenizer and
the LoRA adapter (load), the base's weights on disk (weights), the training-time ops that keep less memory (loss,
lean_ops, offload) and generation (generation)."""
