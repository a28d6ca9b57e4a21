"""Ollama's Modelfile beside each GGUF file: FROM, the chat format the model was trained with, and its stop tokens."""

from __future__ import annotations

from qtune.data.templates import alpaca_prompt

# Ollama's Go templates, one per chat format, each rendering a conversation as the tokenizer's chat template does (less
# the BOS token, which llama.cpp adds as the GGUF says). Ollama passes system messages both as .System and inside
# .Messages, so the loops skip them. tests/test_modelfile.py renders each against the published chat template.
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        "{{ end }}<|im_start|>assistant\n",
        ["<|im_end|>"],
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        '{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|eot_id|>"],
    ),
    # Gemma has no system role: its chat template puts the system text at the start of the first user turn
    "gemma": (
        '{{- range $i, $m := .Messages }}{{ if ne $m.Role "system" }}<start_of_turn>'
        '{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}\n'
        "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }}<end_of_turn>\n{{ end }}{{ end }}"
        "<start_of_turn>model\n",
        ["<end_of_turn>"],
    ),
    "phi3": (
        "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        '{{- range .Messages }}{{ if ne .Role "system" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}'
        "<|assistant|>\n",
        ["<|end|>"],
    ),
    "mistral": (
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}',
        ["[INST]", "</s>"],
    ),
}


def ollama_modelfile(gguf_name: str, tokenizer, trained_on_alpaca: bool) -> str:
    """The Modelfile of GGUF file `gguf_name`: FROM, TEMPLATE (the chat format the model was trained with) and the
    stop tokens."""
    template_text = tokenizer.chat_template or ""
    stops = [tokenizer.eos_token]
    if trained_on_alpaca:
        template = alpaca_prompt("{{ .Prompt }}") + "{{ .Response }}"
    elif "<|im_start|>" in template_text:
        template, extra = OLLAMA_TEMPLATES["chatml"]
        stops += extra
    elif "<|start_header_id|>" in template_text:
        template, extra = OLLAMA_TEMPLATES["llama3"]
        stops += extra
    elif "<start_of_turn>" in template_text:
        template, extra = OLLAMA_TEMPLATES["gemma"]
        stops += extra
    elif "<|assistant|>" in template_text and "<|end|>" in template_text:
        template, extra = OLLAMA_TEMPLATES["phi3"]
        stops += extra
    elif "[INST]" in template_text:
        template, extra = OLLAMA_TEMPLATES["mistral"]
        stops += extra
    else:
        template = "{{ .Prompt }}"
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"
