"""The gateway benchmark: llmbus next to direct calls and LiteLLM, on loopback, under load.

Run it with `python -m scripts.bench` (or `just bench`); `--help` lists the knobs and
docs/benchmarks.md has the results and how to read them.
"""
