"""Fake ``KVConnectorFactory`` with the newest resolution rules (engines.md 2.2): module_path first,
then the registry; the three-argument constructor is required."""

import importlib
import inspect

from .v1.base import KVConnectorBase_V1


class KVConnectorFactory:
    _registry: dict = {}

    @classmethod
    def register_connector(cls, name: str, module_path: str, class_name: str) -> None:
        if name in cls._registry:
            raise ValueError(f"Connector '{name}' is already registered.")

        def loader():
            return getattr(importlib.import_module(module_path), class_name)

        cls._registry[name] = loader

    @classmethod
    def get_connector_class(cls, kv_transfer_config):
        name = kv_transfer_config.kv_connector
        if kv_transfer_config.kv_connector_module_path:
            module = importlib.import_module(kv_transfer_config.kv_connector_module_path)
            connector_cls = getattr(module, name, None)
            if connector_cls is None:
                raise ValueError(f"Class {name} not found in {kv_transfer_config.kv_connector_module_path}")
        elif name in cls._registry:
            connector_cls = cls._registry[name]()
        else:
            raise ValueError(f"Unsupported connector type: {name}")
        return connector_cls

    @classmethod
    def create_connector(cls, config, role, kv_cache_config):
        kvt = config.kv_transfer_config
        connector_cls = cls.get_connector_class(kvt)
        if not issubclass(connector_cls, KVConnectorBase_V1):
            raise ValueError(f"{connector_cls} is not a KVConnectorBase_V1")
        if len(inspect.signature(connector_cls.__init__).parameters) < 4:
            raise ValueError(f"{connector_cls.__name__} must accept (vllm_config, role, kv_cache_config)")
        return connector_cls(config, role, kv_cache_config)
