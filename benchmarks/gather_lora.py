"""Batched multi-LoRA by gather (what vLLM's punica kernels do, in plain torch): the LoRA peer of the multi-tenant
benchmark, every tenant's LoRA in one batch, each row its own adapter. Used by ``multitenant.py``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


class GatherLoRA:
    """Every tenant's LoRA stacked per projection; forward hooks add bmm(bmm(x, A[idx]), B[idx]) per row.

    ``set_rows(idx)`` says which adapter each batch row uses (0 = none, tenant t = t + 1); ``None`` = off.
    """

    def __init__(
        self, model: torch.nn.Module, adapter_dirs: Sequence[Path], dtype: torch.dtype, device: torch.device
    ) -> None:
        from safetensors.torch import load_file

        per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for d in adapter_dirs:
            cfg = json.loads((d / "adapter_config.json").read_text())
            r = cfg["r"]
            scaling = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
            state = load_file(str(d / "adapter_model.safetensors"))
            for key, a in state.items():
                if not key.endswith("lora_A.weight"):
                    continue
                b = state[key.replace("lora_A", "lora_B")]
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                per_module.setdefault(name, []).append((a.t(), b.t() * scaling))  # (d_in, r), (r, d_out)
        modules = dict(model.named_modules())
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = []
        for name, pairs in per_module.items():
            if len(pairs) != len(adapter_dirs):
                raise ValueError(f"{name}: only {len(pairs)} of {len(adapter_dirs)} adapters adapt it")
            a0, b0 = pairs[0]
            A = torch.stack([torch.zeros_like(a0)] + [a for a, _ in pairs]).to(device=device, dtype=dtype)
            B = torch.stack([torch.zeros_like(b0)] + [b for _, b in pairs]).to(device=device, dtype=dtype)
            self.stacks[name] = (A.contiguous(), B.contiguous())
            self._hooks.append(modules[name].register_forward_hook(self._hook(name)))
        self.device = device
        self.rows: tuple[int, ...] | None = None
        self._gathered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.stacks.values() for t in pair)

    def set_rows(self, rows: Sequence[int] | None) -> None:
        rows = None if rows is None else tuple(int(r) for r in rows)
        if rows != self.rows:
            self.rows = rows
            self._gathered = {}

    def _weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._gathered.get(name)
        if w is None:
            A, B = self.stacks[name]
            if len(set(self.rows)) == 1:  # one adapter for the whole batch: shared weights, plain matmuls
                w = (A[self.rows[0]], B[self.rows[0]])
            else:
                idx = torch.tensor(self.rows, device=self.device)
                w = (A.index_select(0, idx), B.index_select(0, idx))  # (batch, d_in, r), (batch, r, d_out)
            self._gathered[name] = w
        return w

    def _hook(self, name: str) -> Callable:
        def after(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.rows is None:
                return None
            x = args[0]
            if x.shape[0] != len(self.rows):
                raise RuntimeError(f"gather-LoRA: batch of {x.shape[0]} rows, {len(self.rows)} adapter indices set")
            A, B = self._weights(name)
            if A.dim() == 2:
                return output + (x.to(A.dtype) @ A) @ B
            return output + torch.bmm(torch.bmm(x.to(A.dtype), A), B).to(output.dtype)

        return after

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# ------------------------------------------------------------------------------------------ the runs
