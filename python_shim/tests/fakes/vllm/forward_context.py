"""Fake ``ForwardContext``."""

from dataclasses import dataclass, field


@dataclass
class ForwardContext:
    attn_metadata: object = None
    no_compile_layers: dict = field(default_factory=dict)
    virtual_engine: int = 0
