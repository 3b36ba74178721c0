"""What an engine that serves IAPT adapters must (not) be configured with, checked on both sides.

* ``check_engine_args``: the caller's keyword arguments to ``vllm.LLM`` / ``EngineArgs``, before any engine
  starts (``IAPTServing.engine_args`` calls it): a clear ValueError naming the fix.
* ``check_vllm_config``: the configuration vLLM resolved, in the model's constructor (the backstop for an
  engine started some other way, e.g. ``vllm serve`` with ``--hf-overrides``).

Refused, and why:

* chunked prefill: the generators pool the whole instruction at every layer; a prefill split across steps
  would pool part of it (the planner raises on such a step; refusing the setting keeps it from happening);
* prefix caching without salt: a cached block that holds the slots depends on the whole instruction, which
  may extend past the block, so two requests sharing a block's tokens can differ in the slots' states.
  ``IAPTServing.prompt`` gives every IAPT request a ``cache_salt`` derived from its adapter and instruction:
  with it, prefix caching is exact, and ``salted_prefix_caching=True`` says every IAPT prompt is built so;
* pipeline or tensor parallelism, speculative decoding: not tested yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_KEY = "iapt"  # additional_config[CONFIG_KEY] = {"adapters": {name: folder}, "marker": id, ...}

_CHUNKED = (
    "IAPT on vLLM needs enable_chunked_prefill=False: the generators read the whole instruction at "
    "every layer, and a prefill split across steps would give them part of it"
)
_PREFIX = (
    "IAPT on vLLM needs enable_prefix_caching=False, or salted_prefix_caching=True with every IAPT prompt "
    "built by IAPTServing.prompt (which salts it): a cached block holding the slots depends on the whole "
    "instruction, so unsalted caching would hand one request another's soft tokens"
)


def check_engine_args(kwargs: Mapping[str, Any], salted_prefix_caching: bool = False) -> None:
    """Refuse engine arguments under which IAPT requests would not get their own soft tokens."""
    if kwargs.get("enable_chunked_prefill"):
        raise ValueError(_CHUNKED)
    if kwargs.get("enable_prefix_caching") and not salted_prefix_caching:
        raise ValueError(_PREFIX)
    for key in ("pipeline_parallel_size", "tensor_parallel_size", "data_parallel_size"):
        if int(kwargs.get(key) or 1) > 1:
            raise ValueError(f"IAPT on vLLM is not tested with {key} > 1 yet; serve with {key}=1")
    if kwargs.get("speculative_config"):
        raise ValueError("IAPT on vLLM is not tested with speculative decoding yet; drop speculative_config")


def plugin_config(vllm_config: Any) -> dict[str, Any]:
    """The ``additional_config["iapt"]`` an engine was started with."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    spec = extra.get(CONFIG_KEY) if isinstance(extra, Mapping) else None
    if not isinstance(spec, Mapping) or "marker" not in spec:
        raise ValueError(
            "an IAPT model needs additional_config={'iapt': {'adapters': {...}, 'marker': ...}}: "
            "build the engine arguments with iapt.vllm.IAPTServing(...).engine_args()"
        )
    return {
        "adapters": dict(spec.get("adapters") or {}),
        "marker": int(spec["marker"]),
        "salted_prefix_caching": bool(spec.get("salted_prefix_caching", False)),
    }


def check_vllm_config(vllm_config: Any) -> None:
    """The same refusals, on the configuration vLLM resolved (its defaults included)."""
    spec = plugin_config(vllm_config)
    if vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError(_CHUNKED)
    if vllm_config.cache_config.enable_prefix_caching and not spec["salted_prefix_caching"]:
        raise ValueError(_PREFIX)
    parallel = vllm_config.parallel_config
    for key in ("pipeline_parallel_size", "tensor_parallel_size", "data_parallel_size"):
        if int(getattr(parallel, key, 1) or 1) > 1:
            raise ValueError(f"IAPT on vLLM is not tested with {key} > 1 yet; serve with {key}=1")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError("IAPT on vLLM is not tested with speculative decoding yet; drop speculative_config")
