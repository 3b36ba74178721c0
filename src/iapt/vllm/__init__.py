"""IAPT adapters served by vLLM: a general plugin registering IAPT variants of vLLM's Llama, Mistral, Qwen2 and
Gemma 3 (text-only ``Gemma3ForCausalLM``).

Install: ``bash scripts/setup_vllm.sh`` (a second venv, ``.venv-vllm``). See docs/VLLM.md.

Registered through the ``vllm.general_plugins`` entry point (``register``), so every vLLM process, the
engine core's and the workers' included, knows the architectures ``IAPT<Arch>ForCausalLM``; an engine
selects them with ``hf_overrides={"architectures": [...]}``, which :meth:`IAPTServing.engine_args` sets.
"""

from __future__ import annotations

from iapt.vllm.config import check_engine_args, check_vllm_config
from iapt.vllm.protocol import Header
from iapt.vllm.serving import ARCHITECTURES, IAPTServing

__all__ = ["ARCHITECTURES", "Header", "IAPTServing", "check_engine_args", "check_vllm_config", "register"]


def register() -> None:
    """vLLM general plugin: register the IAPT architectures (lazily: the model module loads with the model)."""
    from vllm import ModelRegistry

    from iapt.vllm.lora import patch_cpu_lora_ops

    patch_cpu_lora_ops()  # vLLM's CPU LoRA ops apply the last adapter to tokens without one (see there)
    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"iapt.vllm.model:{arch}")
