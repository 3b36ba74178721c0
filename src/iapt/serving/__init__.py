"""``iapt serve``: one frozen backbone, many tenants' IAPT adapters in one continuously batched engine."""

from iapt.serving.engine import (
    AdapterBank,
    Engine,
    Event,
    QueueFull,
    Request,
    RequestHandle,
    TokenLogprob,
    UnknownAdapter,
)

__all__ = [
    "AdapterBank",
    "BackgroundServer",
    "Engine",
    "Event",
    "QueueFull",
    "Request",
    "RequestHandle",
    "TokenLogprob",
    "UnknownAdapter",
    "create_app",
    "serve",
]


def __getattr__(name: str):  # the HTTP side needs fastapi/uvicorn (the "serve" extra): import it lazily
    if name in ("create_app", "serve", "BackgroundServer"):
        from iapt.serving import app

        return getattr(app, name)
    raise AttributeError(name)
