"""Backend registry: one name per backend, imported lazily so a worker loads one client."""

from __future__ import annotations

import importlib

from ttg.backends.base import Backend, BrokerConfig
from ttg.errors import ConfigError

BACKENDS = {
    "redis": "ttg.backends.redis_streams:RedisStreamsBackend",
    "rabbitmq": "ttg.backends.rabbitmq:RabbitMQBackend",
    "static": "ttg.backends.static:StaticBackend",
}


def get_backend(name: str, config: BrokerConfig) -> Backend:
    try:
        path = BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend {name!r}: valid backends are {', '.join(BACKENDS)}"
        ) from None
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)(config)
