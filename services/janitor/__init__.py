"""The janitor: one per Ollama host; keeps models present, warm or unloaded as models.toml says."""
