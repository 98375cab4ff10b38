"""Fake vLLM package."""
