"""The offline demo and the tests' models: tokenizers and small models built here from nothing, pretrained briefly
on generated text (tiny_models), the demo's tasks and preference pairs, and its multiple-choice benchmark (task)."""
