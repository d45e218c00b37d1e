"""Test doubles for external services: the only allowed stand-ins in tests and benchmarks.

Import from the submodules (``from tests.fakes.ollama import FakeOllama``); this package
imports nothing eagerly so ``python -m tests.fakes.ollama`` runs the module only once.
"""
