"""Overhead of IAPT against its peers, measured in one run, printed as one markdown table.

1. Training step (forward + backward + AdamW step on a batch x seq batch, labels on the second half so the
   instruction is the first half): IAPT vs PEFT LoRA (q_proj, v_proj) vs PEFT prefix tuning, the LoRA rank
   and the number of virtual tokens chosen so that their trainable-parameter counts come closest to IAPT's.
   Each method lives in a process of its own, so that its peak memory is its own, and the parent steps the
   three in lockstep, rotating their order every round, so that drift hits all of them alike.
     CPU:  peak RSS (VmHWM) minus the RSS once model, adapter and batch are built. The high-water mark is
           reset right then (``echo 5 > /proc/self/clear_refs``), so the loading peak cannot hide the
           training peak; where that is impossible, ru_maxrss minus that RSS (and the notes say so).
     CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() then, peak stats reset there.
2. Generation (a batch of chat-templated instructions of different lengths, left padded, greedy,
   ``min_new_tokens = max_new_tokens`` so every row runs the full length): IAPT vs the bare backbone, a
   second, untouched copy of the same weights (so not even IAPT's inactive hooks are on it). A streamer
   timestamps every step: prefill = time to first token (TTFT), decode = total - TTFT, which produces the
   remaining new_tokens - 1 tokens of every row, so decode tok/s = (new_tokens - 1) * batch / decode. The
   two models alternate order across repeats. A separate ``generate(max_new_tokens=1)`` call gives a
   second prefill measurement.

Shared machines: every sample also records how much CPU other processes took while it ran (from
/proc/stat minus this process's own CPU time). A repeat (a generation pair, or a training round) where
that exceeds ``--quiet-threshold`` of the machine is marked contended and another is run, up to
``--max-extra``; medians are taken over the quiet ones when there are at least three (else over all, and
the notes say so). Before each repeat or round the script also waits, up to ``--wait-quiet`` seconds, for
the machine to be quiet; on a dedicated machine that costs nothing.

    python benchmarks/overhead.py --model default --device cpu --dtype float32 --threads 2
    python benchmarks/overhead.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import (
    Clock,
    CpuMeter,
    WorkerProcess,
    proc_status_kib,
    reset_hwm,
    sync_for,
    wait_quiet,
)

METHODS = ("iapt", "lora", "prefix")
ABLATIONS = ("frozen", "iapt_const", "iapt_skip_mlp", "iapt_fixed")  # --ablations: where IAPT's time goes
INSTRUCTIONS = [  # realistic instructions of different lengths; the batch takes the first --batch of them
    "Name three primary colors.",
    "Translate into French: The weather is nice today, so we are going for a walk in the park.",
    "Write a haiku about autumn leaves.",
    (
        "Explain in simple terms why the sky is blue during the day and red or orange at sunset. Keep the "
        "answer short enough for a ten-year-old to follow, and avoid technical jargon."
    ),
    "Give me a Python function that returns the n-th Fibonacci number.",
    (
        "Summarize the following paragraph in one sentence: Photosynthesis is the process by which green "
        "plants and some other organisms use sunlight to synthesize foods from carbon dioxide and water. It "
        "generally involves the green pigment chlorophyll and generates oxygen as a byproduct."
    ),
    "What is the capital of Australia?",
    (
        "List four tips for writing a clear email to a colleague you have never met before, and explain "
        "each tip in one line."
    ),
]


# ---------------------------------------------------------------------------------------------- helpers
def _load(args: argparse.Namespace):
    from iapt.models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    return model.to(args.device), tokenizer


def _plan_sizes(config: Any, iapt_config: Any) -> dict[str, Any]:
    """Trainable-parameter counts of IAPT, and the LoRA rank / prefix length that come closest to it.

    Counted by PEFT itself on meta-device copies (no memory): both counts are linear in the size, so the
    count at size 1 is the count per unit (checked at size 2).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from iapt import get_iapt_model

    def meta_model():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))

    def count(kind: str, size: int) -> int:
        peft_config = _lora_config(size) if kind == "lora" else _prefix_config(size)
        return get_peft_model(meta_model(), peft_config).get_nb_trainable_parameters()[0]

    iapt_count = get_iapt_model(meta_model(), copy.deepcopy(iapt_config)).get_nb_trainable_parameters()[0]
    plan: dict[str, Any] = {"iapt": {"params": iapt_count, "size": 0}}
    for kind in ("lora", "prefix"):
        unit = count(kind, 1)
        if count(kind, 2) != 2 * unit:
            raise RuntimeError(f"{kind}'s trainable-parameter count is not linear in its size")
        size = min((max(1, iapt_count // unit), iapt_count // unit + 1), key=lambda s: abs(s * unit - iapt_count))
        plan[kind] = {"size": size, "params": size * unit, "per_unit": unit}
    return plan


def _lora_config(rank: int):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM
    )


def _prefix_config(tokens: int):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(num_virtual_tokens=tokens, task_type=TaskType.CAUSAL_LM)


def _iapt_config(args: argparse.Namespace):
    from iapt import IAPTConfig

    return IAPTConfig(num_soft_tokens=args.soft_tokens, bottleneck=args.bottleneck)


def _quiet_median(values: list[float], quiet: list[bool]) -> float:
    kept = [v for v, q in zip(values, quiet) if q]
    return statistics.median(kept if len(kept) >= min(3, len(values)) else values)


# ------------------------------------------------------------------------------------ training worker
def _ablation(args: argparse.Namespace, base) -> tuple[Any, dict[str, Any]]:
    """Variants that split IAPT's training cost into its parts (only with --ablations; nothing in iapt changes):

    frozen         the backbone alone, no adapter, gradients flowing back to the input embeddings: the floor
                   every method here pays (all three need gradients through every layer).
    iapt_const     IAPT with each generator replaced by a learned constant (n, d) prompt: the cost of the n
                   slot positions alone, without the generators' compute.
    iapt_skip_mlp  IAPT whose layers run their MLP on the real tokens only at prefill: a slot's output of
                   layer l is overwritten by layer l+1's generator (and the last layer's is never projected
                   onto the vocabulary), so the MLP work on slots is wasted. A prototype of a fix.
    iapt_fixed     iapt_skip_mlp, plus: each generator reads only the columns up to the batch's last
                   instruction token (in training the response half has no pooling weight anyway), and the
                   LM head gets a contiguous input (``logits_to_keep`` slices the slots off, leaving a strided
                   view that matmul runs as a slower batched product). All three leave the outputs unchanged.
    """
    from torch import nn

    from iapt import get_iapt_model

    if args.method == "frozen":
        for p in base.parameters():
            p.requires_grad_(False)
        base.enable_input_require_grads()
        return base, {"use_cache": False}
    model = get_iapt_model(base, _iapt_config(args))
    n, d = args.soft_tokens, base.get_input_embeddings().weight.shape[1]
    if args.method == "iapt_const":

        def constant(generator: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            return lambda hidden, mask: generator.const.expand(hidden.shape[0], -1, -1)

        for generator in model.generators.values():
            generator.requires_grad_(False)
            generator.const = nn.Parameter(torch.zeros(n, d, device=args.device))
            generator.forward = constant(generator)
        return model, {}
    # iapt_skip_mlp, iapt_fixed
    from iapt.backbone import find_layers

    def before_mlp(module, inputs):
        if not model.prefilling:  # decoding, or the bare backbone: leave it alone
            return None
        return (inputs[0][:, n:], *inputs[1:])

    def after_mlp(module, inputs, output):
        if not model.prefilling:
            return None
        return torch.cat([output.new_zeros(output.shape[0], n, output.shape[2]), output], dim=1)

    for layer in find_layers(base, model.iapt_config.layers_path):
        layer.mlp.register_forward_pre_hook(before_mlp)
        layer.mlp.register_forward_hook(after_mlp)
    if args.method == "iapt_fixed":
        base.get_output_embeddings().register_forward_pre_hook(lambda module, inputs: (inputs[0].contiguous(),))
        for generator in model.generators.values():

            def trimmed(hidden, mask, forward=generator.forward):
                used = mask.any(0).nonzero()
                last = int(used.max()) + 1 if used.numel() else 1
                return forward(hidden[:, :last], mask[:, :last])

            generator.forward = trimmed
    return model, {}


def train_worker(args: argparse.Namespace) -> None:
    """One method's training steps, in a process of its own; the parent says when to step (one JSON line
    per command on stdin, one JSON line per answer on the original stdout)."""
    from peft import get_peft_model

    from iapt import get_iapt_model

    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr

    torch.manual_seed(0)
    sync = sync_for(args.device)
    base, _ = _load(args)
    if args.method == "iapt":
        model = get_iapt_model(base, _iapt_config(args))
        extra: dict[str, Any] = {}  # IAPT's forward sets use_cache=False when given labels
    elif args.method == "lora":
        model = get_peft_model(base, _lora_config(args.size))
        extra = {"use_cache": False}
    elif args.method == "prefix":
        model = get_peft_model(base, _prefix_config(args.size))
        extra = {"use_cache": False}  # PEFT hands the prefix in as past_key_values whatever use_cache says
    elif args.method in ABLATIONS:
        model, extra = _ablation(args, base)
    else:
        raise ValueError(args.method)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    vocab = base.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : args.seq // 2] = -100  # the first half is the instruction (IAPT pools it), the second is learnt

    with torch.no_grad():  # transformers maps float32 safetensors lazily: page every weight in before the
        for t in [*model.parameters(), *model.buffers()]:  # baseline, or the first step's page faults
            t.sum()  # would count ~0.5 GiB of file-backed weights as training memory
    gc.collect()
    sync()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_base = torch.cuda.memory_allocated()
        mem_method = "torch.cuda.max_memory_allocated() − memory_allocated() after building"
    else:
        mem_base = (proc_status_kib("VmRSS") or 0) * 1024
        hwm_reset = reset_hwm()
        mem_method = (
            "peak RSS (VmHWM, reset via /proc/self/clear_refs once built) − RSS once built"
            if hwm_reset
            else "ru_maxrss − RSS once built (the high-water mark could not be reset)"
        )

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    reply({"ready": True, "trainable_params": sum(p.numel() for p in trainable)})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            sync()
            with CpuMeter() as meter:
                t0 = time.perf_counter()
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                if optimizer is not None:
                    optimizer.step()
                sync()
                t3 = time.perf_counter()
            reply(
                {
                    "forward": t1 - t0,
                    "backward": t2 - t1,
                    "optimizer": t3 - t2,
                    "step": t3 - t0,
                    "foreign": meter.foreign,
                    "loss": float(loss),
                }
            )
        elif command == "finish":
            if cuda:
                peak = torch.cuda.max_memory_allocated()
            else:
                import resource

                hwm = proc_status_kib("VmHWM")
                peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            reply({"peak_mem_bytes": peak - mem_base, "mem_base_bytes": mem_base, "mem_method": mem_method})
            return
        else:
            raise ValueError(f"unknown command {command!r}")


def _worker(args: argparse.Namespace, method: str, size: int, log_dir: str) -> WorkerProcess:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "train",
        "--method",
        method,
        "--size",
        str(size),
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--soft-tokens",
        str(args.soft_tokens),
        "--bottleneck",
        str(args.bottleneck),
    ]
    return WorkerProcess(cmd, f"training {method}", Path(log_dir) / f"{method}.log", args.threads)


def run_training(args: argparse.Namespace, plan: dict[str, Any], waited: dict[str, float]) -> dict[str, Any]:
    methods = METHODS + tuple(args.ablations)
    results: dict[str, Any] = {m: {"steps": [], "warmup": []} for m in methods}
    with tempfile.TemporaryDirectory() as log_dir:
        workers = {m: _worker(args, m, plan.get(m, {}).get("size", 0), log_dir) for m in methods}
        try:
            for m, w in workers.items():
                results[m].update(w.ask(None))  # ready
            rounds, quiet_rounds, r = 0, 0, 0
            limit = args.warmup + args.steps + args.max_extra
            while r < limit and quiet_rounds < args.steps:
                order = [methods[(i + r) % len(methods)] for i in range(len(methods))]
                waited["training"] += wait_quiet(args.quiet_threshold, args.wait_quiet)
                samples = {m: workers[m].ask("step") for m in order}
                warm = r < args.warmup
                quiet = all(s["foreign"] <= args.quiet_threshold for s in samples.values())
                for m, s in samples.items():
                    results[m]["warmup" if warm else "steps"].append({**s, "quiet": quiet})
                if not warm:
                    rounds += 1
                    quiet_rounds += quiet
                print(
                    f"[train] round {r + 1}{' (warm-up)' if warm else ''}: "
                    + ", ".join(f"{m} {samples[m]['step']:.2f} s" for m in methods)
                    + f"; others' CPU ≤ {max(s['foreign'] for s in samples.values()):.0%}"
                    + ("" if quiet or warm else " (contended)"),
                    file=sys.stderr,
                    flush=True,
                )
                r += 1
            for m, w in workers.items():
                results[m].update(w.ask("finish"))
        finally:
            for w in workers.values():
                w.close()
    quiet = [s["quiet"] for s in results["lora"]["steps"]]
    for m in methods:
        steps = results[m]["steps"]
        results[m]["median_step"] = _quiet_median([s["step"] for s in steps], quiet)
        # the ratio of each round's step to LoRA's step in the same round: drift between rounds cancels
        results[m]["paired_ratio"] = _quiet_median(
            [s["step"] / ref["step"] for s, ref in zip(steps, results["lora"]["steps"])], quiet
        )
        for part in ("forward", "backward", "optimizer"):
            results[m][f"median_{part}"] = _quiet_median([s[part] for s in steps], [s["quiet"] for s in steps])
    return results


# ---------------------------------------------------------------------------------------- generation
def _prompts(tokenizer, batch: int, device: str) -> dict[str, torch.Tensor]:
    texts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def run_generation(args: argparse.Namespace, base, tokenizer, waited: dict[str, float]) -> dict[str, Any]:
    from iapt import get_iapt_model

    sync = sync_for(args.device)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    models = {"bare": base, "iapt": get_iapt_model(copy.deepcopy(base), _iapt_config(args))}
    for model in models.values():
        model.eval()
    inputs = _prompts(tokenizer, args.batch, args.device)
    plen = inputs["input_ids"].shape[1]

    def timed(name: str, max_new: int) -> dict[str, float]:
        clock = Clock(sync)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        with CpuMeter() as meter:
            out = models[name].generate(
                **inputs,
                streamer=clock,
                do_sample=False,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                pad_token_id=tokenizer.pad_token_id,
            )
            sync()
        if out.shape[1] - plen != max_new:
            raise RuntimeError(f"{name} generated {out.shape[1] - plen} tokens, expected {max_new}")
        ttft = clock.times[1] - meter.start  # times[0]: put(prompt), before any forward; times[1]: first token
        sample = {
            "total": meter.wall,
            "ttft": ttft,
            "decode": meter.wall - ttft,
            "foreign": meter.foreign,
            "tokens": out[:, plen:],
        }
        if cuda:
            sample["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        return sample

    for name in models:  # warm-up: first calls allocate and pick kernels
        timed(name, args.new_tokens)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    prefill: dict[str, list[dict[str, Any]]] = {k: [] for k in models}
    quiet_repeats, r = 0, 0
    while r < args.repeats + args.max_extra and quiet_repeats < args.repeats:
        order = ["bare", "iapt"] if r % 2 == 0 else ["iapt", "bare"]
        waited["generation"] += wait_quiet(args.quiet_threshold, args.wait_quiet)
        pair = {}
        for name in order:
            pair[name] = timed(name, args.new_tokens)
            prefill[name].append(timed(name, 1))
        quiet = all(s["foreign"] <= args.quiet_threshold for s in pair.values())
        quiet_repeats += quiet
        for name in order:
            pair[name]["quiet"] = quiet
            samples[name].append(pair[name])
        print(
            f"[gen] repeat {r + 1}: "
            + ", ".join(
                f"{k} ttft {pair[k]['ttft'] * 1e3:.0f} ms, decode {pair[k]['decode']:.2f} s" for k in ("bare", "iapt")
            )
            + f"; others' CPU ≤ {max(s['foreign'] for s in pair.values()):.0%}"
            + ("" if quiet else " (contended)"),
            file=sys.stderr,
            flush=True,
        )
        r += 1

    same = all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(samples["iapt"], samples["iapt"][1:]))
    decode_tokens = (args.new_tokens - 1) * args.batch
    result: dict[str, Any] = {
        "prompt_lengths": inputs["attention_mask"].sum(1).tolist(),
        "padded_length": plen,
        "deterministic": same,
    }
    for name in models:
        s = samples[name]
        quiet = [x["quiet"] for x in s]
        result[name] = {
            "ttft": _quiet_median([x["ttft"] for x in s], quiet),
            "decode": _quiet_median([x["decode"] for x in s], quiet),
            "decode_tok_s": _quiet_median([decode_tokens / x["decode"] for x in s], quiet),
            "total": _quiet_median([x["total"] for x in s], quiet),
            "prefill_call": _quiet_median([x["total"] for x in prefill[name]], quiet),
            "samples": [{k: v for k, v in x.items() if k != "tokens"} for x in s],
            "prefill_samples": [{k: v for k, v in x.items() if k != "tokens"} for x in prefill[name]],
        }
        if cuda:
            result[name]["peak_mem_bytes"] = max(x["peak_mem_bytes"] for x in s)
    # IAPT / bare within each repeat (the two ran back to back), median over the repeats: drift cancels
    quiet = [x["quiet"] for x in samples["iapt"]]
    pairs = list(zip(samples["iapt"], samples["bare"]))
    result["paired_ratio"] = {
        "ttft": _quiet_median([a["ttft"] / b["ttft"] for a, b in pairs], quiet),
        "decode_tok_s": _quiet_median([b["decode"] / a["decode"] for a, b in pairs], quiet),
        "total": _quiet_median([a["total"] / b["total"] for a, b in pairs], quiet),
        "prefill_call": _quiet_median(
            [a["total"] / b["total"] for a, b in zip(prefill["iapt"], prefill["bare"])], quiet
        ),
    }
    result["iapt"]["trainable_params"] = models["iapt"].get_nb_trainable_parameters()[0]
    return result


# ------------------------------------------------------------------------------------------- report
def _range(values: list[float], fmt: str) -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def render(
    args: argparse.Namespace, plan: dict[str, Any], train: dict[str, Any], gen: dict[str, Any]
) -> tuple[str, list[str]]:
    mib = 1024 * 1024
    names = {
        "iapt": f"IAPT (r={args.bottleneck}, n={args.soft_tokens})",
        "lora": f"LoRA q_proj,v_proj (rank {plan['lora']['size']})",
        "prefix": f"Prefix tuning ({plan['prefix']['size']} virtual tokens)",
        "bare": "bare backbone",
        "frozen": "ablation: frozen backbone, no adapter",
        "iapt_const": "ablation: IAPT slots, constant prompts (no generators)",
        "iapt_skip_mlp": "ablation: IAPT, MLP skipped on slots (fix prototype)",
        "iapt_fixed": "ablation: IAPT, MLP skip + generator trim + contiguous LM head (fix prototype)",
    }
    rows = [
        "| Benchmark | Method | Trainable params | Median | Range | Peak memory Δ | Ratio: time | Ratio: memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lora = train["lora"]
    for m in [m for m in (*METHODS, *ABLATIONS) if m in train]:
        t = train[m]
        steps = [s["step"] for s in t["steps"]]
        rows.append(
            f"| Train step {args.batch}×{args.seq} (fwd+bwd+AdamW) | {names[m]} | {t['trainable_params']:,} "
            f"| {t['median_step']:.3f} s | {_range(steps, '{:.2f}')} s | {t['peak_mem_bytes'] / mib:,.0f} MiB "
            f"| {t['paired_ratio']:.3f} vs LoRA "
            f"| {t['peak_mem_bytes'] / lora['peak_mem_bytes']:.3f} vs LoRA |"
        )
    bare = gen["bare"]
    params = {"bare": 0, "iapt": gen["iapt"]["trainable_params"]}
    cuda_mem = "peak_mem_bytes" in bare  # CPU: both models share one process, so no per-model peak
    mem = {m: f"{gen[m]['peak_mem_bytes'] / mib:,.0f} MiB" if cuda_mem else "—" for m in params}
    mem_ratio = {
        m: f"{gen[m]['peak_mem_bytes'] / bare['peak_mem_bytes']:.3f} vs bare" if cuda_mem else "—" for m in params
    }
    decode_tokens = (args.new_tokens - 1) * args.batch
    specs = [
        ("Prefill: time to first token", "ttft", lambda x: x["ttft"] * 1e3, "ms", "{:.0f}", "samples"),
        (
            "Prefill: generate(max_new_tokens=1)",
            "prefill_call",
            lambda x: x["total"] * 1e3,
            "ms",
            "{:.0f}",
            "prefill_samples",
        ),
        (
            f"Decode ({args.batch}×{args.new_tokens - 1} tokens after the first)",
            "decode_tok_s",
            lambda x: decode_tokens / x["decode"],
            "tok/s",
            "{:.1f}",
            "samples",
        ),
        (
            f"Generation end to end ({args.batch}×{args.new_tokens} new tokens)",
            "total",
            lambda x: x["total"],
            "s",
            "{:.2f}",
            "samples",
        ),
    ]
    for label, key, per_sample, unit, fmt, source in specs:
        for m in ("iapt", "bare"):
            g = gen[m]
            value = g[key] * (1e3 if unit == "ms" else 1)
            rows.append(
                f"| {label} | {names[m]} | {params[m]:,} | {fmt.format(value)} {unit} "
                f"| {_range([per_sample(x) for x in g[source]], fmt)} {unit} | {mem[m]} "
                f"| {gen['paired_ratio'][key] if m == 'iapt' else 1.0:.3f} vs bare | {mem_ratio[m]} |"
            )
    decode_ratio = gen["paired_ratio"]["decode_tok_s"]
    train_ratio = train["iapt"]["paired_ratio"]
    targets = [
        (
            f"- Target: IAPT decode within 5% of the bare backbone (tok/s ratio ≥ 0.95): {decode_ratio:.3f} → "
            f"**{'PASS' if decode_ratio >= 0.95 else 'MISS'}**"
        ),
        (
            f"- Target: IAPT training step no slower than LoRA's (time ratio ≤ 1.00): {train_ratio:.3f} → "
            f"**{'PASS' if train_ratio <= 1.0 else 'MISS'}**"
        ),
    ]
    return "\n".join(rows), targets


def _parse_ablations(text: str) -> list[str]:
    names = list(ABLATIONS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ABLATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)} or 'all'")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", help="backbone dtype: float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="generation repeats per model (after a warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per method (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training rounds first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="training sequence length")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--bottleneck", type=int, default=32, help="IAPT bottleneck r")
    parser.add_argument("--soft-tokens", type=int, default=4, help="IAPT soft tokens n per layer")
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.10,
        help="share of the machine's CPU other processes may take before a repeat counts as contended",
    )
    parser.add_argument(
        "--max-extra", type=int, default=3, help="extra repeats/rounds allowed to replace contended ones"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each repeat/round, wait up to this many seconds for other processes to calm down",
    )
    parser.add_argument("--skip-train", action="store_true", help="generation only")
    parser.add_argument(
        "--ablations",
        default="",
        type=lambda text: _parse_ablations(text),
        help=f"comma-separated variants to add to the training lockstep, or 'all': {', '.join(ABLATIONS)} "
        f"(see _ablation; each adds a process and a step per round)",
    )
    parser.add_argument("--out", default=None, help="also write every raw measurement to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    if args.worker == "train":
        train_worker(args)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the training workers

    import transformers

    started = time.perf_counter()
    load_before = os.getloadavg()
    base, tokenizer = _load(args)
    plan = _plan_sizes(base.config, _iapt_config(args))
    print(
        f"[plan] IAPT {plan['iapt']['params']:,} trainable; LoRA rank {plan['lora']['size']} → "
        f"{plan['lora']['params']:,}; prefix {plan['prefix']['size']} tokens → {plan['prefix']['params']:,}",
        file=sys.stderr,
        flush=True,
    )
    waited = {"generation": 0.0, "training": 0.0}
    gen = run_generation(args, base, tokenizer, waited)
    del base
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if args.skip_train:
        print(
            json.dumps(
                {
                    k: ({kk: vv for kk, vv in v.items() if "samples" not in kk} if isinstance(v, dict) else v)
                    for k, v in gen.items()
                },
                indent=1,
            )
        )
        return 0
    train = run_training(args, plan, waited)
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started

    table, targets = render(args, plan, train, gen)
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name(args.device)
    else:
        device = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or platform.machine(),
        )
    n_quiet = {m: sum(s["quiet"] for s in train[m]["steps"]) for m in train}
    g_quiet = sum(s["quiet"] for s in gen["iapt"]["samples"])
    notes = [
        (
            f"- Parameter matching: IAPT {plan['iapt']['params']:,}; LoRA {plan['lora']['per_unit']:,} per rank → rank "
            f"{plan['lora']['size']} = {plan['lora']['params']:,}; prefix {plan['prefix']['per_unit']:,} per virtual "
            f"token → {plan['prefix']['size']} = {plan['prefix']['params']:,}"
        ),
        f"- Training: {args.batch}×{args.seq} random tokens, labels on the second half; one process per method, "
        f"stepped in lockstep with the order rotating; median of {n_quiet['iapt']} quiet of "
        f"{len(train['iapt']['steps'])} timed rounds after {args.warmup} warm-up; time ratio = median over rounds "
        f"of (step / LoRA's step in the same round). Median forward / backward / AdamW (s): "
        + "; ".join(
            f"{m} {train[m]['median_forward']:.3f} / {train[m]['median_backward']:.3f} / "
            f"{train[m]['median_optimizer']:.3f}"
            for m in train
        ),
        f"- Training memory: {train['iapt']['mem_method']}",
        (
            f"- Generation: {args.batch} chat-templated instructions of {gen['prompt_lengths']} tokens, left padded to "
            f"{gen['padded_length']}; {args.new_tokens} new tokens each, greedy, min_new_tokens={args.new_tokens}; "
            f"median of {g_quiet} quiet of {len(gen['iapt']['samples'])} repeats (order alternating); TTFT from "
            f"streamer timestamps; decode tok/s = {args.new_tokens - 1}×{args.batch} / (total − TTFT); "
            f"ratio = median over repeats of IAPT / bare within the repeat; "
            f"IAPT output identical across repeats: {gen['deterministic']}"
        ),
        (
            f"- Machine: {args.device} ({device}, {os.cpu_count()} CPUs), {args.dtype}, {args.threads} threads, torch "
            f"{torch.__version__}, transformers {transformers.__version__}; load average {load_before[0]:.2f} → "
            f"{load_after[0]:.2f}; quiet = others' CPU ≤ {args.quiet_threshold:.0%}; {elapsed:.0f} s in all, of which "
            f"{sum(waited.values()):.0f} s waiting for other processes to calm down"
        ),
    ]
    if min(n_quiet["iapt"], g_quiet) < min(3, args.steps, args.repeats):
        targets.append(
            "- **Warning: too few quiet repeats — other processes took the CPU; these medians include "
            "contended samples and are unreliable. Rerun on a quiet machine.**"
        )
    print(table)
    print()
    print("\n".join(targets + notes))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "plan": plan,
                    "train": train,
                    "generation": gen,
                    "targets": targets,
                    "notes": notes,
                    "table": table,
                    "loadavg": [load_before, load_after],
                    "elapsed_s": elapsed,
                    "waited_s": waited,
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "device": device,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
