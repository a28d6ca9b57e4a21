"""The Ollama Modelfile of each chat format renders a conversation exactly as the model's own chat template does:
a wrong template or stop token is the "gibberish in Ollama" users report (unsloth #3899, LLaMA-Factory #6320)."""

import copy

import pytest
from go_template import render

from qtune.export.formats.gguf.writer import ollama_modelfile

# The published chat templates (tool-calling branches left out), as the tokenizers of these families carry them
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
        " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
        "\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
        "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set "
        "loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% set role = 'model' if "
        "message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + "
        "(first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}
STOPS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>", "mistral": "</s>"}


# Mistral v0.1's chat template has no system role
CASES = [
    (family, system) for family in CHAT_TEMPLATES for system in (False, True) if not (family == "mistral" and system)
]


@pytest.mark.parametrize("family, with_system", CASES)
def test_the_modelfile_renders_a_conversation_as_the_chat_template_does(family, with_system, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the fixture is shared by the session
    tokenizer.chat_template = CHAT_TEMPLATES[family]
    messages = [
        {"role": "user", "content": "Reverse the word apple."},
        {"role": "assistant", "content": "elppa"},
        {"role": "user", "content": "And pear?"},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": "You answer in one word."})
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = expected.removeprefix(tokenizer.bos_token or "")  # llama.cpp adds BOS when it tokenizes
    if family == "mistral":
        expected = expected.replace(tokenizer.eos_token, "</s>")  # the tiny tokenizer's EOS stands for Mistral's

    modelfile = ollama_modelfile("model.gguf", tokenizer, trained_on_alpaca=False)
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    assert render(template, system, messages) == expected
    assert f'PARAMETER stop "{STOPS[family]}"' in modelfile
    assert modelfile.startswith("FROM ./model.gguf\n")
