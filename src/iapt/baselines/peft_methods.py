"""LoRA, prompt tuning and prefix tuning (P-tuning v2), all from PEFT, behind one thin wrapper.

The wrapper (:class:`PeftBaseline`) gives the three the interface every model of this project has: logits
aligned with ``input_ids``, ``generate`` returning the prompt followed by the new tokens, left padding giving
each row's result alone, ``save_pretrained`` / ``unload``. What it fixes in PEFT 0.21.2 with transformers 5.23
(checked on tiny Llama, Qwen2, Mistral, Gemma3 and GPT-2 models, see ``tests/baselines``):

1. **Positions under left padding (prompt tuning, prefix tuning).** PEFT's prompt tuning drops the
   ``position_ids`` that ``generate`` derives from the attention mask ("Position ids are not supported for
   parameter efficient tuning. Ignoring position ids.", ``PeftModel._adjust_prompt_learning_kwargs``), so the
   backbone falls back to ``arange``: a left-padded row sees its tokens at positions shifted by its padding
   and scores differently from the same row alone. Every ``forward`` without ``position_ids`` (training,
   dev loss; any method) has the same flaw. Workaround: a forward pre-hook on the backbone, active only
   inside this wrapper's calls, derives ``position_ids`` from the 2-D attention mask PEFT hands the backbone
   (virtual tokens included) whenever none were given: ``cumsum(mask) - 1``. Prefix tuning's own
   ``generate`` path (PEFT offsets the mask-derived positions by the prefix length) already agrees with it.
2. **Logits of prompt tuning** come back with ``num_virtual_tokens`` extra leading positions; the wrapper
   drops them (and the matching hidden states), so logits line up with ``input_ids``. PEFT's loss is kept
   (it pads the labels with -100 itself).
3. **Prefix initialisation.** PEFT starts prefixes from N(0, 1) keys and values, which wreck a pretrained
   model before any training; ``build_prefix`` sets them to the frozen model's own keys and values of random
   vocabulary tokens instead (Li & Liang's real-word init; see :func:`init_prefix_from_tokens`).
4. **Prefix tuning without a KV cache** (``generate(use_cache=False)``) fails inside PEFT (the prefix is
   re-injected as a cache at every step while the mask grows: a shape error in attention). The wrapper
   refuses it with a clear error; with the cache (the default) everything holds.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from iapt.backbone import input_embeddings

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

LORA_TARGETS = {"gpt2": ["c_attn"]}  # model_type -> modules; every other family: q_proj and v_proj
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj"]
_POSITION_WARNING = "Position ids are not supported for parameter efficient tuning"


def lora_targets(base: nn.Module) -> list[str]:
    """The attention projections LoRA adapts: q_proj and v_proj (GPT-2: its fused c_attn)."""
    model_type = getattr(base.config, "model_type", "")
    targets = LORA_TARGETS.get(model_type, DEFAULT_LORA_TARGETS)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if not set(targets) <= names:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        )

        fallback = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if fallback and set(fallback) <= names:
            return list(fallback)
        raise ValueError(
            f"LoRA targets {targets} are not modules of {type(base).__name__} "
            f"(model_type={model_type!r}); no known targets for this family"
        )
    return targets


def _target_shapes(base: nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) features of every module LoRA will adapt."""
    shapes = []
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        module = getattr(module, "base_layer", module)  # a base that already carries LoRA layers
        if isinstance(module, nn.Linear):
            shapes.append((module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
            shapes.append(tuple(module.weight.shape))
    return shapes


def lora_count(base: nn.Module, rank: int) -> int:
    """r·(in + out) per adapted projection (A: r×in, B: out×r; no bias)."""
    return sum(rank * (i + o) for i, o in _target_shapes(base, lora_targets(base)))


def _prompt_learning_dims(base: nn.Module, kind: str) -> tuple[int, int]:
    """(num_layers, token_dim) exactly as PEFT fills them in for this base (GQA: key/value width)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType
    from peft.utils.other import _prepare_prompt_learning_config

    cls = PrefixTuningConfig if kind == "prefix" else PromptTuningConfig
    cfg = _prepare_prompt_learning_config(cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=1), base.config)
    return cfg.num_layers, cfg.token_dim


def prompt_tuning_count(base: nn.Module, tokens: int) -> int:
    """m·d: one embedding per virtual token."""
    return tokens * _prompt_learning_dims(base, "prompt-tuning")[1]


def prefix_count(base: nn.Module, tokens: int) -> int:
    """m · layers · 2 · (key/value width): a key and a value per virtual token and layer (no reparametrisation)."""
    layers, token_dim = _prompt_learning_dims(base, "prefix")
    return tokens * layers * 2 * token_dim


class PeftBaseline(nn.Module):
    """A PEFT model with this project's interface (see the module docstring for what it fixes)."""

    def __init__(self, peft_model: nn.Module, method: str) -> None:
        super().__init__()
        self.peft_model: PeftModel = cast("PeftModel", peft_model)  # get_peft_model / PeftModel.from_pretrained's
        self.method = method
        config = self.peft_model.active_peft_config
        self.num_virtual_tokens: int = config.num_virtual_tokens if config.is_prompt_learning else 0
        self._active = False
        backbone = self.peft_model.get_base_model()
        self._hooks = [backbone.register_forward_pre_hook(self._positions_from_mask, with_kwargs=True)]

    @property
    def base_model(self) -> nn.Module:
        """The backbone (with LoRA layers injected, for LoRA)."""
        return self.peft_model.get_base_model()

    def _positions_from_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._active or kwargs.get("position_ids") is not None:
            return None
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None  # no padding (generate dropped an all-ones mask) or a prepared 4-D mask: nothing to fix
        source = kwargs.get("input_ids")
        if source is None:
            source = kwargs.get("inputs_embeds")
        if source is None and args:
            source = args[0]
        if source is None:
            return None
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kwargs["position_ids"] = positions[:, -source.shape[1] :]
        return args, kwargs

    @contextlib.contextmanager
    def _activated(self) -> Iterator[None]:
        previous, self._active = self._active, True
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_POSITION_WARNING)
                yield
        finally:
            self._active = previous

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("instruction_mask", None)  # PEFT methods do not read the instruction separately
        with self._activated():
            out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        m = self.num_virtual_tokens
        if self.method == "prompt-tuning" and m:
            source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            assert source is not None, "PEFT's forward takes input_ids or inputs_embeds"
            length = source.shape[1]
            if getattr(out, "logits", None) is not None and out.logits.shape[1] == length + m:
                out.logits = out.logits[:, m:]
            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(h[:, m:] if h.shape[1] == length + m else h for h in out.hidden_states)
        return out

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """PEFT's generate: prompt followed by the new tokens (pad on the left)."""
        kwargs.pop("instruction_mask", None)
        if self.method == "prefix" and kwargs.get("use_cache") is False:
            raise ValueError(
                "prefix tuning generates with the KV cache only (PEFT 0.21 fails without it): drop use_cache=False"
            )
        with self._activated():
            return self.peft_model.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """PEFT's files: adapter_config.json (peft_type LORA / PROMPT_TUNING / PREFIX_TUNING) + weights.

        ``save_embedding_layers=False``: these methods never touch the vocabulary, and PEFT's "auto" would ask
        the Hub whether the base's config exists (a network call, and a warning when offline)."""
        self.peft_model.save_pretrained(str(save_directory), save_embedding_layers=False)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def unload(self) -> nn.Module:
        """Remove the hooks (and LoRA's injected layers) and give the bare backbone back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.method == "lora":
            return self.peft_model.unload()
        return self.peft_model.get_base_model()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("peft_model", "_hooks", "_active"):
                raise
            return getattr(self.peft_model, name)


def build_lora(base: nn.Module, rank: int) -> PeftBaseline:
    from peft import LoraConfig, TaskType, get_peft_model

    base = cast("PreTrainedModel", base)  # a Hugging Face causal LM
    targets = lora_targets(base)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.05,
        target_modules=targets,
        fan_in_fan_out=base.config.model_type == "gpt2",
        bias="none",
    )
    return PeftBaseline(get_peft_model(base, config), "lora")


def build_prompt_tuning(base: nn.Module, tokens: int) -> PeftBaseline:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    # Lester et al.: initialising from vocabulary embeddings beats random soft tokens.
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
    )
    return PeftBaseline(get_peft_model(base, config), "prompt-tuning")


def build_prefix(base: nn.Module, tokens: int, init_from_vocab: bool = True) -> PeftBaseline:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    # P-tuning v2: a trainable key and value per layer and virtual token, no reparametrisation MLP.
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens, prefix_projection=False)
    model = get_peft_model(base, config)
    if init_from_vocab:
        vocab = input_embeddings(base).num_embeddings
        init_prefix_from_tokens(model, torch.randint(0, vocab, (tokens,)))
    return PeftBaseline(model, "prefix")


@torch.no_grad()
def init_prefix_from_tokens(peft_model: nn.Module, token_ids: torch.Tensor) -> None:
    """Set a prefix to the frozen model's own keys and values of ``token_ids`` (a hard prompt, made soft).

    PEFT initialises prefixes with N(0, 1) keys and values, which wreck a pretrained model before training
    (SmolLM2-135M, 6 sentiment examples: loss 14.4 against 4.84 bare) as random soft tokens do for IAPT. Li &
    Liang (prefix tuning, §7.2) initialise from the activations of real words instead; this does that with
    random vocabulary tokens, the prefix analogue of prompt tuning's vocabulary init. Just after it, the model
    computes exactly what the bare backbone computes after those tokens (the real tokens start at position m,
    where PEFT puts them).
    """
    peft_model = cast("PeftModel", peft_model)  # a prefix-tuning PeftModel
    config = peft_model.active_peft_config
    embedding = cast(nn.Embedding, peft_model.prompt_encoder[peft_model.active_adapter].embedding)  # PrefixEncoder's
    backbone = peft_model.get_base_model()
    device = input_embeddings(backbone).weight.device
    ids = token_ids.reshape(1, -1).to(device)
    if ids.shape[1] != config.num_virtual_tokens:
        raise ValueError(f"{ids.shape[1]} tokens for a prefix of {config.num_virtual_tokens}")
    was_training = backbone.training
    backbone.eval()  # no dropout in the activations we copy
    try:
        cache = backbone(input_ids=ids, use_cache=True).past_key_values
    finally:
        backbone.train(was_training)
    rows = []
    for layer in cache.layers[: config.num_layers]:
        keys, values = layer.keys[0], layer.values[0]  # (heads, m, head_dim)
        rows += [keys.transpose(0, 1).reshape(ids.shape[1], -1), values.transpose(0, 1).reshape(ids.shape[1], -1)]
    # PEFT reads embedding row t as (layers·2, heads, head_dim): key of layer l at 2l, its value at 2l + 1
    weight = torch.stack(rows, dim=1).reshape(ids.shape[1], -1)
    if weight.shape != embedding.weight.shape:
        raise ValueError(
            f"the backbone's cache {tuple(weight.shape)} does not fit the prefix {tuple(embedding.weight.shape)}"
        )
    embedding.weight.copy_(weight.to(embedding.weight.dtype))


def load_peft(base: nn.Module, directory: Path, method: str) -> PeftBaseline:
    """``PeftModel.from_pretrained``, with a ValueError naming both sides for a base of another shape."""
    from peft import PeftModel

    base = cast("PreTrainedModel", base)  # a Hugging Face causal LM
    try:
        model = PeftModel.from_pretrained(base, str(directory))
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "shape" not in str(exc):
            raise
        name = getattr(base.config, "_name_or_path", "") or type(base).__name__
        raise ValueError(
            f"adapter {directory} does not fit this base model ({name}, model_type="
            f"{base.config.model_type!r}): {str(exc).strip().splitlines()[-1]}; load it on the base "
            f"it was trained on"
        ) from None
    model.requires_grad_(False)  # PEFT leaves a prompt-learning base trainable when loading for inference
    return PeftBaseline(model, method)
