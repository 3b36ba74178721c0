"""Run-time adapter loads on vLLM's side: a worker extension, called with ``LLMEngine.collective_rpc``.

The adapter bank lives with the model, in vLLM's worker (the engine core's process by default), so the front
process cannot change it directly. vLLM mixes ``worker_extension_cls`` (``IAPTServing.engine_args`` sets it
to :class:`IAPTWorkerExtension`) into its worker class; ``collective_rpc("iapt_add_adapter", ...)`` runs the
method in every worker, between engine steps. No request of an adapter may be in flight when it is removed:
``VLLMEngine`` refuses such an unload.
"""

from __future__ import annotations

from typing import Any


class IAPTWorkerExtension:
    """Methods vLLM's worker gains (``self`` is the worker): add or remove an IAPT adapter in its model's bank."""

    def _iapt(self) -> Any:
        runner = getattr(self, "model_runner", None)
        model = runner.get_model() if runner is not None else None
        iapt = getattr(model, "iapt", None)
        if iapt is None:
            raise RuntimeError("this vLLM engine does not run an IAPT model (IAPTServing.engine_args selects one)")
        return iapt

    def iapt_add_adapter(self, name: str, path: str, index: int) -> None:
        self._iapt().add(name, path, index)

    def iapt_remove_adapter(self, name: str) -> None:
        self._iapt().remove(name)

    def iapt_adapters(self) -> dict[int, str]:
        """Header index -> adapter name, as the worker has them (what a test compares with the front's)."""
        return dict(self._iapt().names)
