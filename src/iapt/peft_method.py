"""IAPT as a PEFT method: ``get_peft_model(model, IAPTConfig(...))``, ``PeftModel.save_pretrained`` and
``PeftModel.from_pretrained`` work as for LoRA, and read and write the same folders as ``IAPTModel``.

PEFT 0.21 has a registry for methods (``register_peft_method``) but a closed ``PeftType`` enum, so ``import iapt``
adds an ``IAPT`` member to it before registering (an upstream PR would add the member to ``PeftType`` and move
this tuner under ``peft/tuners/iapt``). The tuner wraps :class:`~iapt.model.IAPTModel`: the hooks and the slot
layout exist once, there; this module only translates PEFT's calls.

Adapter files: ``adapter_model.safetensors`` holds the generators' state dict under the keys ``IAPTModel`` uses
(``0.down.weight``, ...), so ``IAPTModel.from_pretrained`` and ``PeftModel.from_pretrained`` read each other's
folders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from iapt.config import IAPTConfig
from iapt.model import IAPTModel

PEFT_NAME = "iapt"
_KEY_PREFIX = "generators."


def _add_peft_type() -> Any:
    """Give PEFT's closed ``PeftType`` enum an ``IAPT`` member (idempotent)."""
    from peft.utils.peft_types import PeftType

    if "IAPT" in PeftType.__members__:
        return PeftType["IAPT"]  # added at run time (below): not an attribute the type checker knows
    member = str.__new__(PeftType, "IAPT")
    member._name_ = "IAPT"
    member._value_ = "IAPT"
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    type.__setattr__(PeftType, "IAPT", member)
    PeftType._member_map_["IAPT"] = member
    PeftType._value2member_map_["IAPT"] = member
    PeftType._member_names_.append("IAPT")
    return member


class IAPTTuner(nn.Module):
    """PEFT's ``base_model`` for IAPT: holds the transformers model as ``.model`` (as every PEFT tuner does) and the
    generators as ``.generators``; forward and generate are :class:`~iapt.model.IAPTModel`'s."""

    prefix = _KEY_PREFIX

    def __init__(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        super().__init__()
        if len(peft_config) != 1:
            raise ValueError("an IAPT PeftModel holds one adapter; serve several with iapt.serving.Engine")
        self.model = model
        self.peft_config = peft_config
        self.active_adapter = adapter_name
        self._disabled = False
        iapt = IAPTModel(cast(PreTrainedModel, model), peft_config[adapter_name])  # PEFT's transformers model
        object.__setattr__(self, "_iapt", iapt)  # not a submodule: the backbone would appear twice in state_dict
        self.generators = iapt.generators
        # PeftModel.from_pretrained sets inference_mode unless is_trainable: the adapter is then frozen.
        self.generators.requires_grad_(not peft_config[adapter_name].inference_mode)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            kwargs.pop("instruction_mask", None)
            return self.model(*args, **kwargs)
        return self._iapt(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            kwargs.pop("instruction_mask", None)
            # transformers types generate's self as a protocol that mypy finds no model matches
            return cast(GenerationMixin, self.model).generate(*args, **kwargs)  # type: ignore[misc]
        return self._iapt.generate(*args, **kwargs)

    # PEFT's adapter switches. (``PeftModel.disable_adapter()`` itself asks PEFT's layer-status code, which knows
    # only tuners that replace layers, so it refuses IAPT: use these two, or ``get_base_model()``.)
    def disable_adapter_layers(self) -> None:
        self._disabled = True

    def enable_adapter_layers(self) -> None:
        self._disabled = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.active_adapter]:
            raise ValueError(f"this IAPT model has one adapter, {self.active_adapter!r}; got {adapter_name!r}")
        self.generators.requires_grad_(not inference_mode)

    def unload(self) -> nn.Module:
        return self._iapt.unload()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(
            "IAPT's soft tokens depend on each input, so they cannot be merged into the weights; "
            "use unload() for the bare backbone"
        )

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        yield

    # PEFT's state-dict hooks (save: the generators under IAPTModel's keys; load: back under this module's) ----
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        marker = "." + _KEY_PREFIX
        return {k.split(marker, 1)[1]: v for k, v in state_dict.items() if marker in k}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        here = next((name for name, module in model.named_modules() if isinstance(module, IAPTTuner)), None)
        if here is None:
            raise ValueError("no IAPT tuner in this model to load the adapter into")
        head = f"{here}.{_KEY_PREFIX}" if here else _KEY_PREFIX
        expected = set(cast(IAPTTuner, model.get_submodule(here)).generators.state_dict())
        unknown = sorted(set(state_dict) - expected)
        missing = sorted(expected - set(state_dict))
        if unknown or missing:
            raise ValueError(
                f"the adapter's weights do not match its config: missing {missing[:5]}, unexpected {unknown[:5]}"
            )
        return {head + k: v for k, v in state_dict.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def register() -> None:
    """Make IAPT a PEFT method (called by ``import iapt``; idempotent)."""
    peft_type = _add_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=PEFT_NAME, config_cls=IAPTConfig, model_cls=IAPTTuner, prefix=_KEY_PREFIX)


def register_with_pipelines() -> None:
    """Let ``pipeline("text-generation", model=iapt_model)`` run without its "not supported" warning (it checks the
    model's class name against a list that holds PEFT's wrappers). Called by ``import iapt`` (+26 ms)."""
    try:
        from transformers.pipelines.base import SUPPORTED_PEFT_TASKS
    except ImportError:
        return
    names = SUPPORTED_PEFT_TASKS.setdefault("text-generation", [])
    if "IAPTModel" not in names:
        names.append("IAPTModel")
