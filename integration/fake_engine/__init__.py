"""A vLLM-faithful fake engine: a scheduler and worker processes that call the real shim in vLLM's
order (engines.md 1.4-1.5, 6.3), with real torch CPU KV tensors."""
