"""Exports of a trained run: merge.py (the adapter merged into its base), nf4.py, gguf.py (llama.cpp / Ollama files)
and run.py (`qtune export`: writes the requested formats, then measures each one)."""
