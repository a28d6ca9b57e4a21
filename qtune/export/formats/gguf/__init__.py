"""GGUF files for llama.cpp and Ollama: the streaming writer and vocabulary (writer), each architecture's keys and
tensor changes (families), llama.cpp's type per tensor (tensor_types), the k-quant blocks (kquants), which models can
have a GGUF at all (support) and Ollama's Modelfile (ollama)."""
