"""Edges with one of issue 25's changes undone, for `--edge NAME=MODULE` A/B runs
(docs/benchmarks.md, "What each change bought"): each module patches one thing, then runs the
edge exactly as `llmbus edge` does."""
