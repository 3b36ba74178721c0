"""What a trained IAPT adapter's soft tokens do, layer by layer: a probe of one adapter on a task's test prompts.

For each layer with a generator it prints, averaged over ``--examples`` test prompts (one prompt per forward):

- ``anchor rms`` and ``top-3 share``: the size of the slots' anchor states and the share of their energy in their
  3 largest channels (massive activations: a norm then sees little but those channels);
- ``token rms``: the median RMS of the instruction tokens' states at that layer (what ordinary tokens look like);
- ``out rms``: the RMS of what the generator adds to the anchor (slot − anchor);
- ``cos(slot, anchor)``: how far the trained slot turned away from its anchor (1.0: not at all), and ``normed``: the
  same through the layer's own input norm, gain included (what its attention projections read: a gain that damps
  the massive channels makes a small turn of the raw state a large one here);
- ``pool entropy``: the attention pooling's entropy over the instruction (nats; ``log T`` is uniform, 0 picks one
  token), and ``picks``: how many distinct tokens the n queries put their largest weight on;
- ``token cos``: the largest cosine between two of the n soft tokens' outputs (1.0: identical tokens);
- ``across``: the spread of the output across prompts over its size (0: the same soft tokens for every prompt).

    python benchmarks/slot_probe.py runs/demo/adapter --task sentiment --examples 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch


def probe(iapt: Any, prompts: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """One row per generator layer over ``prompts`` (tokenised, one unpadded prompt each) run through ``iapt``."""
    from iapt.generator import PromptGenerator, attention_weights, project

    iapt.eval()
    n, s = iapt.num_soft_tokens, iapt.sink_columns
    hidden_size = iapt.base_model.config.hidden_size
    layers = iapt.base_model.model.layers
    seen: dict[int, list[dict[str, Any]]] = {int(i): [] for i in iapt.generators}

    def on_generator(i: int, module: PromptGenerator, inputs: tuple, output: torch.Tensor) -> None:
        hidden, mask = inputs
        keep = mask.bool()
        z = project(hidden, module.down.weight, module.down.bias, module.input_norm)
        rms = hidden.float().square().mean(-1).sqrt()[keep]
        record: dict[str, Any] = {"token_rms": float(rms.median()), "pool": None}
        if module.pooling == "attention":
            w = attention_weights(z, module.queries, keep)[0][keep[0]]  # (T, n)
            entropy = -(w.clamp_min(1e-12).log() * w).sum(0)
            record["pool"] = (float(entropy.mean()), len(set(w.argmax(0).tolist())), math.log(w.shape[0]))
        seen[i].append(record)

    def on_layer(i: int, module: torch.nn.Module, args: tuple) -> None:
        if i in seen and seen[i] and "slot" not in seen[i][-1]:
            # one unpadded row: its soft tokens are columns s..s+n-1 (s: the sink column, IAPTConfig.sink_token)
            seen[i][-1]["slot"] = args[0][0, s : s + n].detach().float()

    hooks = [
        g.register_forward_hook(lambda m, a, o, i=int(i): on_generator(i, m, a, o)) for i, g in iapt.generators.items()
    ]
    hooks += [layer.register_forward_pre_hook(lambda m, a, i=i: on_layer(i, m, a)) for i, layer in enumerate(layers)]
    try:
        for enc in prompts:
            with torch.no_grad():
                iapt(**enc)
    finally:
        for h in hooks:
            h.remove()

    rows = []
    for i in sorted(seen):
        generator = iapt.generators[str(i)]
        anchor = getattr(generator, "anchor", None)
        anchor = torch.zeros(n, hidden_size) if anchor is None else anchor.float().reshape(n, -1)
        slots = torch.stack([r["slot"] for r in seen[i]])  # (E, n, d)
        norm = getattr(layers[i], "input_layernorm", None)  # Llama-style layers; else the raw states

        def normed(x: torch.Tensor, norm: Any = norm) -> torch.Tensor:
            return x if norm is None else norm(x.to(norm.weight.dtype)).float()

        out = slots - anchor
        energy = anchor.square()
        mean_out = out.mean(0)
        unit = torch.nn.functional.normalize(mean_out, dim=-1)
        token_cos = (unit @ unit.T - 2 * torch.eye(n)).max() if n > 1 else torch.tensor(float("nan"))
        pools = [r["pool"] for r in seen[i] if r["pool"] is not None]
        rows.append(
            {
                "layer": i,
                "anchor_rms": float(anchor.square().mean().sqrt()),
                "top3_share": float((energy.topk(3, dim=-1).values.sum(-1) / energy.sum(-1).clamp_min(1e-30)).mean()),
                "token_rms": statistics.median(r["token_rms"] for r in seen[i]),
                "out_rms": float(out.square().mean().sqrt()),
                "cos_slot_anchor": float(
                    torch.nn.functional.cosine_similarity(slots, anchor.expand_as(slots), dim=-1).mean()
                ),
                "cos_normed": float(
                    torch.nn.functional.cosine_similarity(normed(slots), normed(anchor).expand_as(slots), dim=-1).mean()
                ),
                "pool_entropy": statistics.mean(p[0] for p in pools) if pools else float("nan"),
                "uniform_entropy": statistics.mean(p[2] for p in pools) if pools else float("nan"),
                "picks": statistics.mean(p[1] for p in pools) if pools else float("nan"),
                "token_cos": float(token_cos),
                "across": float((out - mean_out).square().mean().sqrt() / out.square().mean().sqrt().clamp_min(1e-30)),
            }
        )
    return rows


def sink_shares(iapt: Any, prompt: dict[str, torch.Tensor], skip: int = 2) -> dict[str, float]:
    """The attention mass later tokens give the sequence's first positions, layers ``skip``+ (mean over heads and
    query positions past the first 8 tokens): the bare backbone's on its first token, and the adapter's on its
    sink column (``IAPTConfig.sink_token``; 0 without one), its n soft tokens and the first real token after
    them. Eager attention, so the weights are returned."""
    base, n, s = iapt.base_model, iapt.num_soft_tokens, iapt.sink_columns
    previous = base.config._attn_implementation  # transformers' own record of the current implementation
    base.set_attn_implementation("eager")
    seen: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o[1])) for layer in base.model.layers]
    try:
        with torch.no_grad():
            with iapt.disable_adapter():
                iapt(**prompt, output_attentions=True)
            bare = torch.stack(seen)[skip:, 0]
            seen.clear()
            iapt(**prompt, output_attentions=True)
            ours = torch.stack(seen)[skip:, 0]
    finally:
        for h in hooks:
            h.remove()
        base.set_attn_implementation(previous)
    return {
        "bare_first_token": float(bare[:, :, 8:, 0].mean()),
        "sink_column": float(ours[:, :, 8 + n + s :, :s].sum(-1).mean()),
        "slots": float(ours[:, :, 8 + n + s :, s : s + n].sum(-1).mean()),
        "first_real_token": float(ours[:, :, 8 + n + s :, n + s].mean()),
    }


def table(rows: list[dict[str, float]]) -> str:
    head = (
        "| layer | anchor rms | top-3 share | token rms | out rms | cos(slot, anchor) | normed "
        "| pool entropy (uniform) | picks | token cos | across |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['anchor_rms']:.1f} | {r['top3_share']:.2f} | {r['token_rms']:.2f} | "
            f"{r['out_rms']:.2f} | {r['cos_slot_anchor']:.3f} | {r['cos_normed']:.3f} | "
            f"{r['pool_entropy']:.2f} ({r['uniform_entropy']:.1f}) "
            f"| {r['picks']:.1f} | {r['token_cos']:.2f} | {r['across']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path)
    p.add_argument("--task", required=True)
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--model", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from iapt.data.collate import format_prompt
    from iapt.data.tasks import get_task
    from iapt.model import IAPTModel
    from iapt.models import load_model

    base, tokenizer = load_model(args.model)
    examples = get_task(args.task).load("test", limit=args.examples)
    prompts = [tokenizer(format_prompt(tokenizer, ex.prompt), return_tensors="pt") for ex in examples]
    iapt = IAPTModel.from_pretrained(base, args.adapter)
    rows = probe(iapt, prompts)
    print(table(rows))
    shares = sink_shares(iapt, prompts[0])
    print(
        f"\nattention mass of later tokens (layers 2+, first prompt): bare backbone on its first token "
        f"{shares['bare_first_token']:.2f}; with the adapter on its sink column {shares['sink_column']:.2f}, "
        f"its {iapt.num_soft_tokens} soft tokens {shares['slots']:.2f}, the first real token "
        f"{shares['first_real_token']:.2f}"
    )
    turned = sum(r["cos_slot_anchor"] < 0.99 for r in rows)
    normed = sum(r["cos_normed"] < 0.99 for r in rows)
    print(
        f"\nlayers whose slots turn past cos 0.99 from the anchor: {turned} of {len(rows)} (raw states), "
        f"{normed} (through the layer's input norm)"
    )
    if args.json:
        from iapt.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
