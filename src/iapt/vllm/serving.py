"""The client side: which adapters an engine serves, its engine arguments, and each request's prompt."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iapt.adapters import resolve_adapter_dir
from iapt.config import IAPTConfig
from iapt.serving.engine import UnknownAdapter
from iapt.vllm.config import CONFIG_KEY, check_engine_args
from iapt.vllm.protocol import Header

WORKER_EXTENSION = "iapt.vllm.worker.IAPTWorkerExtension"
ARCHITECTURES = {
    "LlamaForCausalLM": "IAPTLlamaForCausalLM",
    "MistralForCausalLM": "IAPTMistralForCausalLM",
    "Qwen2ForCausalLM": "IAPTQwen2ForCausalLM",
    "Gemma3ForCausalLM": "IAPTGemma3ForCausalLM",  # Gemma 3 text-only (model_type gemma3_text)
}


def default_marker(config: Any) -> int:
    """The slot token id (the pad id, else 0: what IAPTModel feeds at its slots), unless prompts begin with it
    (it is the BOS id); then the last id of the vocabulary."""
    pad = getattr(config, "pad_token_id", None)
    marker = pad if isinstance(pad, int) else 0
    bos = getattr(config, "bos_token_id", None)
    return config.vocab_size - 1 if marker == bos else marker


class IAPTServing:
    """IAPT adapters on a vLLM engine, seen from the caller::

        serving = IAPTServing("path/to/base", {"alice": "adapters/alice", "bob": "adapters/bob"})
        llm = vllm.LLM(**serving.engine_args(dtype="float32"))
        outs = llm.generate([serving.prompt(ids, "alice"), serving.prompt(ids)], SamplingParams(...))

    Adapter indices follow the order of ``adapters``; the engine reads the same mapping from
    ``additional_config``, so both sides agree. Only the adapters' configs are read here; the engine reads
    and validates the weights against the base when it loads. :meth:`add` and :meth:`remove` follow an
    engine's run-time loads (``VLLMEngine`` makes the engine's side of them, ``iapt_add_adapter``).
    """

    def __init__(
        self, model: str | Path, adapters: Mapping[str, str | Path] | None = None, marker: int | None = None
    ) -> None:
        from transformers import AutoConfig

        self.model = str(model)
        config = AutoConfig.from_pretrained(self.model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        architectures = list(getattr(config, "architectures", None) or [])
        supported = [a for a in architectures if a in ARCHITECTURES]
        if not supported:
            raise ValueError(
                f"{self.model} is a {architectures or config.model_type} model; IAPT on vLLM serves "
                f"{', '.join(sorted(ARCHITECTURES))} so far"
            )
        self.architecture = ARCHITECTURES[supported[0]]
        self.adapters = {name: str(resolve_adapter_dir(path)) for name, path in (adapters or {}).items()}
        for name in self.adapters:
            if not name or name == self.model:
                raise ValueError(f"adapter name {name!r} is empty or is the base model's name")
        self.configs = {name: IAPTConfig.load(path) for name, path in self.adapters.items()}
        self.marker = default_marker(text) if marker is None else int(marker)
        self.header = Header(self.marker, text.vocab_size, [c.num_slots for c in self.configs.values()])
        self.index = {name: i for i, name in enumerate(self.adapters, start=1)}

    def add(self, name: str, path: str | Path, index: int | None = None) -> int:
        """Serve adapter ``name`` (folder ``path``) at header index ``index`` (default: the first free one)."""
        if not name or name == self.model or name in self.index:
            raise ValueError(f"adapter name {name!r} is empty, the base model's name, or taken")
        folder = str(resolve_adapter_dir(path))
        config = IAPTConfig.load(folder)
        index = self.header.free_index() if index is None else int(index)
        header = self.header.with_slots(index, config.num_slots)  # ValueError: too few slots, no index left
        self.adapters[name], self.configs[name], self.index[name], self.header = folder, config, index, header
        return index

    def remove(self, name: str) -> int:
        """Stop serving ``name``; its index becomes free. Returns the index."""
        if name not in self.index:
            raise UnknownAdapter(f"no adapter named {name!r} is served")
        index = self.index.pop(name)
        del self.adapters[name], self.configs[name]
        self.header = self.header.with_slots(index, 0)
        return index

    def plugin_config(self, salted_prefix_caching: bool = False) -> dict[str, Any]:
        return {
            "adapters": dict(self.adapters),
            "marker": self.marker,
            "salted_prefix_caching": bool(salted_prefix_caching),
        }

    def engine_args(self, salted_prefix_caching: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` / ``EngineArgs``: yours, checked, plus what IAPT needs.

        Refuses (ValueError) chunked prefill, prefix caching unless ``salted_prefix_caching`` (every IAPT
        prompt built by :meth:`prompt`, which salts it), parallelism and speculative decoding.
        """
        check_engine_args(kwargs, salted_prefix_caching)
        overrides = dict(kwargs.pop("hf_overrides", None) or {})
        overrides["architectures"] = [self.architecture]
        extra = dict(kwargs.pop("additional_config", None) or {})
        extra[CONFIG_KEY] = self.plugin_config(salted_prefix_caching)
        return {
            "model": self.model,
            "enable_chunked_prefill": False,
            "enable_prefix_caching": False,
            "worker_extension_cls": WORKER_EXTENSION,  # run-time loads: VLLMEngine calls it by collective_rpc
            **kwargs,
            "hf_overrides": overrides,
            "additional_config": extra,
        }

    def prompt(
        self, prompt: Sequence[int], adapter: str | None = None, instruction_length: int | None = None
    ) -> dict[str, Any]:
        """A vLLM ``TokensPrompt`` for ``prompt`` (token ids) on ``adapter`` (None or the base name: the bare base).

        ``instruction_length``: how many first tokens of the prompt the generators pool (default: all, as
        ``IAPTModel.generate`` without ``instruction_mask``). Raises UnknownAdapter, or ValueError for a base
        prompt that begins with the marker (the model would take it for an IAPT request).
        """
        if adapter is None or adapter == self.model:
            return {"prompt_token_ids": self.header.encode(prompt)}
        if adapter not in self.index:
            raise UnknownAdapter(f"no adapter named {adapter!r} is served (have: {', '.join(self.index) or 'none'})")
        ids = self.header.encode(prompt, self.index[adapter], instruction_length)
        n = self.header.num_slots[self.index[adapter] - 1]
        length = len(prompt) if instruction_length is None else int(instruction_length)
        digest = hashlib.sha256(repr((adapter, ids[: n + length])).encode()).hexdigest()
        return {"prompt_token_ids": ids, "cache_salt": f"iapt-{digest}"}

    def num_slots(self, adapter: str | None) -> int:
        """How many positions of the context the request's slots take (0 for the base)."""
        if adapter is None or adapter == self.model:
            return 0
        return self.header.num_slots[self.index[adapter] - 1]
