"""The vLLM integration: ``CSharpSidecarConnector`` (import it lazily; it needs vLLM)."""
