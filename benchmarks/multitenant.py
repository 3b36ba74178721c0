"""Multi-tenant serving: one frozen backbone, N tenants' adapters, one request trace, six ways to serve it.

The same trace of R requests (each from one of N tenants; a fixed-length chat-templated prompt, a fixed number
of greedy new tokens with EOS ignored) is served by

    row                      adapter                                   scheduler
    bare · engine            none: the bare backbone (adapter=None)    iapt.serving.Engine, continuous batching
    IAPT · engine            each request's tenant IAPT adapter        iapt.serving.Engine, continuous batching
    gather-LoRA · engine     each request's tenant LoRA, batched       iapt.serving.Engine, continuous batching
                             gather (below), via forward hooks
    bare · static            none                                      HF generate, static batches
    PEFT LoRA · static       each request's tenant LoRA, PEFT's        HF generate, static batches
                             mixed-adapter batches (adapter_names=)
    gather-LoRA · static     each request's tenant LoRA, batched       HF generate, static batches
                             gather, via forward hooks

* **Static batches** = up to ``--max-batch-size`` requests in arrival order, one ``generate`` call each, the
  next batch starting when the previous one is done: PEFT has no continuous batching, nor has plain HF
  ``generate``. Prompts all have exactly ``--prompt-len`` tokens, so no batch has padding.
* **Continuous batching** = ``Engine.generate_many`` on the whole trace, at most ``--max-batch-size`` rows
  running. Every request arrives at t = 0 and all have the same lengths, so the engine admits a full batch,
  decodes it to the end, evicts it and admits the next: *the same forward passes as the static batches*
  (the script records every engine schedule and asserts that). ``--engine-mode chunks`` submits the trace
  ``--max-batch-size`` requests at a time instead (the static-batch path through the engine). So engine rows
  and static rows differ only by the decode loop (the engine's vs ``generate``'s), which is why every
  method is compared with the bare backbone *on its own scheduler*, and gather-LoRA runs on both.
* **Batched-gather LoRA** (Punica / S-LoRA's BGMV, in plain PyTorch): every tenant's A and B stacked per
  adapted projection into ``(N+1, d_in, r)`` and ``(N+1, r, d_out)`` tensors (index 0 = zeros = no adapter;
  the LoRA scaling folded into B, exact for alpha = 2r), a forward hook on each ``q_proj`` / ``v_proj`` adds
  ``bmm(bmm(x, A[idx]), B[idx])`` for the rows' adapter indices ``idx``. The gather ``A[idx]`` is taken once
  per batch composition (at its prefill, inside the timed prefill), as BGMV reads each row's adapter in
  place; a batch whose rows all use one adapter takes plain matmuls. It reads each row's adapter once per
  step, like BGMV; no segment grouping (SGMV).
* **PEFT LoRA** loads the N adapters with ``load_adapter`` into one ``PeftModel`` and generates with
  ``adapter_names=[...]`` (PEFT's mixed-batch inference: per adapted layer, one sub-batch per distinct adapter).
* **IAPT** adapters: default IAPTConfig (r = 32, n = 4), generators at every layer with random non-zero
  weights (the up-projection starts at zero). LoRA: PEFT LoRA on q_proj, v_proj at IAPT's parameter budget
  (``iapt.methods.size_for_budget``; SmolLM2-135M: rank 20, 1,152,000 vs IAPT's 1,128,360), alpha = 2r,
  random A and B (B starts at zero).

Traces: ``uniform`` (each request's tenant drawn uniformly from N) and ``zipf`` (tenant k with probability
proportional to k^-s, s = ``--zipf-s`` = 1.2); N = 1 has one trace. The bare rows do not depend on the trace.
Prompts: real instructions through the model's chat template, the user text cut (or extended with further
instructions) so that every prompt has exactly ``--prompt-len`` tokens.

Measured per run (all requests arrive at t = 0):
  prefill s      engine: time inside the prefill forward passes (``Engine._prefill_batch``, wrapped);
                 static: per batch, ``generate`` call start -> first token (streamer timestamp); summed.
  decode tok/s   tokens produced by decode steps, R × (new_tokens − 1), / (wall − prefill s).
  total tok/s    R × new_tokens / wall.   req/s: R / wall.
  p50/p99 lat.   per request, finish time − t0 (its arrival). TTFT likewise for the first token.
  peak mem       one process per method and N ("bare" and "gather-LoRA" serve both schedulers in their
                 process); CPU: peak RSS (VmHWM, reset via /proc/self/clear_refs once the adapters are
                 loaded, so their loading's transient copies do not count) − RSS once the backbone is loaded and
                 paged in, i.e. resident adapters + everything serving allocates (KV cache, activations,
                 gathered weights, allocator slack), over the warm-up and every run at that N; ``adapters`` = the
                 exact bytes of adapter tensors that process holds. CUDA: max_memory_allocated (peak reset once
                 the adapters are loaded) − memory_allocated after loading the backbone.
After an untimed warm-up of every cell (its first batch, 4 new tokens), each (method, N) cell runs
``--repeats`` times; one round runs every cell once, in an order that rotates from
round to round, so drift hits all alike. The table shows the best round per cell (contention only slows a
run down); the targets also give the median over rounds of the ratio against the bare run of the same round.
Every run also records the CPU share other processes took meanwhile (``others' CPU``).

``--check`` asserts that: the IAPT engine's greedy output for the first requests equals offline
``IAPTModel.generate`` of the request alone; gather-LoRA (static and engine) equals PEFT LoRA token for token on
the whole trace; bare engine equals bare ``generate``; adapters change the output.

    python benchmarks/multitenant.py                       # default set, CPU, SmolLM2-135M, float32, ~10 min
    python benchmarks/multitenant.py --requests 64 --max-batch-size 32 --threads 2   # a dedicated machine
    python benchmarks/multitenant.py --model /path/tiny --tenants 1 4 --requests 8 --check
    python benchmarks/multitenant.py --device cuda --dtype bfloat16 --requests 256 --max-batch-size 64
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from gather_lora import GatherLoRA
from machine import (
    Clock,
    CpuMeter,
    WorkerProcess,
    proc_status_kib,
    reset_hwm,
    sync_for,
    wait_quiet,
    worker_channel,
)

INSTRUCTIONS = [
    "Explain in simple terms why the sky is blue during the day and turns red or orange at sunset.",
    "Write a short, friendly email to a colleague asking to move our Tuesday meeting to Thursday afternoon.",
    "Summarize the main causes of the French Revolution in a few sentences for a high-school student.",
    "Give me a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "List five tips for staying focused while working from home, with one sentence of explanation each.",
    "Translate into French: The weather is nice today, so we are going for a walk in the park after lunch.",
    "What are the differences between a virus and a bacterium? Answer in a short paragraph.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "Suggest a three-day itinerary for a first visit to Rome, including food recommendations.",
    "Describe how photosynthesis works and why it matters for life on Earth.",
    "Classify the sentiment of this review as positive or negative: The battery died after two days.",
    "Rewrite the following sentence to sound more formal: Hey, can you send me that report real quick?",
    "Explain what a hash table is and when you would use one instead of a list.",
    "Give a recipe for a simple vegetarian pasta dish that takes less than thirty minutes.",
    "What should I consider when choosing between renting and buying a home?",
    "Write a limerick about a cat who learns to play the piano.",
]
ROWS = [  # (key, method, scheduler, worker)
    ("bare/engine", "bare", "engine", "bare"),
    ("iapt/engine", "IAPT", "engine", "iapt"),
    ("gather/engine", "gather-LoRA", "engine", "gather"),
    ("bare/static", "bare", "static", "bare"),
    ("peft/static", "PEFT LoRA (mixed batch)", "static", "peft"),
    ("gather/static", "gather-LoRA", "static", "gather"),
]
WORKERS = ("bare", "iapt", "peft", "gather")
LORA_ROWS = ("peft/static", "gather/static", "gather/engine")


# ---------------------------------------------------------------------------------------------- helpers
def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _load(args: argparse.Namespace):
    from iapt.models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    return model.to(args.device).eval(), tokenizer


def _gen_kwargs(args: argparse.Namespace, pad: int) -> dict[str, Any]:
    """Greedy, exactly --new-tokens per row: EOS switched off (as the engine's ignore_eos), no min_new_tokens
    (which would mask EOS out of the argmax, and so differ from ignore_eos)."""
    return {
        "max_new_tokens": args.new_tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": pad,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


# ------------------------------------------------------------------------------------------- the trace
def build_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` chat-templated prompts of exactly ``length`` tokens: template head + user text + template tail,
    the user text being instruction i, extended with the following instructions and cut to fit."""
    marker = "\u0000MARK\u0000"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        head, tail = text.split(marker)
    else:
        head, tail = "", ""
    head_ids = tokenizer(head, add_special_tokens=False).input_ids if head else []
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    room = length - len(head_ids) - len(tail_ids)
    if room < 4:
        raise ValueError(
            f"--prompt-len {length} leaves {room} tokens for the instruction after the chat template "
            f"({len(head_ids)} + {len(tail_ids)} tokens)"
        )
    prompts = []
    for i in range(count):
        text = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        j = i + 1
        while len(tokenizer(text, add_special_tokens=False).input_ids) < room:
            text += " " + INSTRUCTIONS[j % len(INSTRUCTIONS)]
            j += 1
        body = tokenizer(text, add_special_tokens=False).input_ids[:room]
        prompts.append(head_ids + body + tail_ids)
    assert all(len(p) == length for p in prompts)
    return prompts


def tenant_trace(requests: int, tenants: int, kind: str, seed: int) -> list[int]:
    """Each request's tenant (0..N-1): uniform, or Zipf(s) popularity (tenant 0 the most popular)."""
    rng = random.Random(f"{seed}-{tenants}-{kind}")
    if kind == "uniform":
        return [rng.randrange(tenants) for _ in range(requests)]
    s = float(kind.split(":")[1])
    weights = [1.0 / (k + 1) ** s for k in range(tenants)]
    return rng.choices(range(tenants), weights=weights, k=requests)


def _trace_kinds(args: argparse.Namespace, tenants: int) -> list[str]:
    return ["uniform"] if tenants == 1 else ["uniform", f"zipf:{args.zipf_s}"]


def _distinct_per_batch(tenants: Sequence[int], batch: int) -> float:
    groups = [tenants[i : i + batch] for i in range(0, len(tenants), batch)]
    return statistics.mean(len(set(g)) for g in groups)


# -------------------------------------------------------------------------------------------- setup
def setup_worker(args: argparse.Namespace) -> None:
    """Build the prompts and max(N) IAPT and LoRA adapters (random, non-zero) under args.workdir."""
    from iapt import IAPTConfig, get_iapt_model
    from iapt.baselines.peft_methods import build_lora, lora_count
    from iapt.methods import count_for, size_for_budget

    torch.manual_seed(args.seed)
    base, tokenizer = _load(args)
    work = Path(args.workdir)
    count = max(args.tenants)
    config = IAPTConfig(bottleneck=args.bottleneck, num_soft_tokens=args.soft_tokens)
    iapt_params = count_for("iapt", base, args.bottleneck)
    rank = args.lora_rank or size_for_budget("lora", base, iapt_params)
    prompts = build_prompts(tokenizer, args.requests, args.prompt_len)

    model = get_iapt_model(base, config)
    assert model.get_nb_trainable_parameters()[0] == iapt_params, "IAPT parameter count disagrees with count_for"
    for t in range(count):
        torch.manual_seed(args.seed * 1000 + t)
        with torch.no_grad():
            for gen in model.generators.values():
                gen.reset_parameters()
                torch.nn.init.normal_(gen.up.weight, std=args.iapt_std)
                torch.nn.init.normal_(gen.up.bias, std=args.iapt_std)
        model.save_pretrained(work / "iapt" / f"t{t:03d}")
    base = model.unload()

    lora = build_lora(base, rank)
    peft_model = lora.peft_model
    for t in range(count):
        torch.manual_seed(args.seed * 1000 + 500 + t)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(p, a=5**0.5)
                elif "lora_B" in name:
                    torch.nn.init.normal_(p, std=args.lora_std)
        peft_model.save_pretrained(str(work / "lora" / f"t{t:03d}"))
    lora.unload()
    meta = {
        "prompts": prompts,
        "iapt_params": iapt_params,
        "lora_rank": rank,
        "lora_params": lora_count(base, rank),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "model_name": getattr(base.config, "name_or_path", "") or str(args.model),
    }
    (work / "meta.json").write_text(json.dumps(meta))


def run_static(
    args: argparse.Namespace,
    generate: Callable[..., torch.Tensor],
    prompts: list[list[int]],
    tenants: list[int],
    before_batch: Callable[[list[int]], dict[str, Any]],
    pad: int,
) -> dict[str, Any]:
    """Static batches of up to max_batch_size requests in arrival order, one ``generate`` call each."""
    sync = sync_for(args.device)
    kwargs = _gen_kwargs(args, pad)
    R, L, B = len(prompts), args.prompt_len, args.max_batch_size
    latency, ttft, tokens = [0.0] * R, [0.0] * R, [None] * R
    prefill = decode = 0.0
    batches = []
    sync()
    t0 = time.perf_counter()
    for start in range(0, R, B):
        rows = list(range(start, min(R, start + B)))
        ids = torch.tensor([prompts[i] for i in rows], device=args.device)
        extra = before_batch([tenants[i] for i in rows])
        clock = Clock(sync)
        tb = time.perf_counter()
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs, **extra)
        sync()
        te = time.perf_counter()
        if out.shape[1] != L + args.new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - L} new tokens, expected {args.new_tokens}")
        first = clock.times[1]
        prefill += first - tb
        decode += te - first
        batches.append(len(rows))
        new = out[:, L:].tolist()
        for k, i in enumerate(rows):
            latency[i], ttft[i], tokens[i] = te - t0, first - t0, new[k]
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "prefill": prefill,
        "decode": decode,
        "latency": latency,
        "ttft": ttft,
        "tokens": tokens,
        "schedule": {"prefill_batches": batches, "decode_steps": len(batches) * (args.new_tokens - 1)},
    }


def run_engine(
    args: argparse.Namespace,
    engine: Any,
    prompts: list[list[int]],
    adapters: list[str | None],
    rows_of: Callable[[list[Any]], None] | None = None,
    tags: list[int] | None = None,
) -> dict[str, Any]:
    """The trace through ``Engine.generate_many``: all at once (continuous batching) or in chunks."""
    from iapt.serving import Request

    sync = sync_for(args.device)
    R = len(prompts)
    latency, ttft = [0.0] * R, [0.0] * R
    prefill = 0.0
    batches: list[int] = []
    steps = 0
    started = [0.0]

    def observe(kind: str, step_requests: Sequence[Any], seconds: float | None) -> None:
        """Around every engine step: which rows it runs (for the gather-LoRA hooks), and each prefill's time."""
        nonlocal prefill, steps
        if seconds is None:
            if rows_of is not None:
                rows_of(list(step_requests))
            if kind == "prefill":
                sync()
                started[0] = time.perf_counter()
            return
        if kind == "prefill":
            sync()
            prefill += time.perf_counter() - started[0]
            batches.append(len(step_requests))
        else:
            steps += 1

    def listener(i: int) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            now = time.perf_counter()
            if event.token is not None and ttft[i] == 0.0:
                ttft[i] = now - t0
            if event.finish_reason is not None:
                latency[i] = now - t0

        return on_event

    requests = []
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        r = Request(list(p), adapter=a, max_tokens=args.new_tokens, ignore_eos=True, on_event=listener(i))
        r.bench_tag = tags[i] if tags is not None else 0  # what the gather-LoRA hooks read
        requests.append(r)
    remove_observer = engine.add_step_observer(observe)
    try:
        sync()
        t0 = time.perf_counter()
        if args.engine_mode == "chunks":
            handles = []
            for s in range(0, R, args.max_batch_size):
                handles += engine.generate_many(requests[s : s + args.max_batch_size])
        else:
            handles = engine.generate_many(requests)
        sync()
        wall = time.perf_counter() - t0
    finally:
        remove_observer()
        if rows_of is not None:
            rows_of(None)
    bad = [h for h in handles if h.finish_reason != "length" or len(h.tokens) != args.new_tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} requests ended early: {bad[0].finish_reason} {bad[0].error}")
    return {
        "wall": wall,
        "prefill": prefill,
        "decode": wall - prefill,
        "latency": latency,
        "ttft": ttft,
        "tokens": [h.tokens for h in handles],
        "schedule": {"prefill_batches": batches, "decode_steps": steps},
    }


# ------------------------------------------------------------------------------------------ the worker
def method_worker(args: argparse.Namespace) -> None:
    """One method at one N, in a process of its own; one JSON command per stdin line, one answer per line."""
    reply = worker_channel()  # what libraries print goes to the log, not into the protocol

    from iapt.serving import Engine

    work = Path(args.workdir)
    meta = json.loads((work / "meta.json").read_text())
    prompts, pad = meta["prompts"], meta["pad_token_id"]
    sync = sync_for(args.device)
    cuda = args.device.startswith("cuda")
    t_start = time.perf_counter()
    base, tokenizer = _load(args)
    with torch.no_grad():  # weights are memory-mapped lazily: page them all in before the memory baseline
        for t in [*base.parameters(), *base.buffers()]:
            t.sum()
    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem_base = torch.cuda.memory_allocated()
        mem_method = (
            "torch.cuda.max_memory_allocated() (peak stats reset once the adapters are loaded) − "
            "memory_allocated() after loading the backbone"
        )
    else:
        mem_base = (proc_status_kib("VmRSS") or 0) * 1024
        mem_method = (
            "peak RSS (VmHWM, reset via /proc/self/clear_refs once the adapters are loaded) − RSS "
            "after loading the backbone"
            if reset_hwm()
            else "ru_maxrss − RSS after loading the backbone (VmHWM could not be reset)"
        )
    t_backbone = time.perf_counter() - t_start

    n, kind = args.n, args.method
    names = [f"t{t:03d}" for t in range(n)]
    t_load = time.perf_counter()
    engine = peft_model = gather = None
    adapter_bytes = 0
    if kind in ("bare", "iapt", "gather"):
        engine = Engine(base, tokenizer, None, max_batch_size=args.max_batch_size)
    if kind == "iapt":
        errors = engine.load_adapters({name: work / "iapt" / name for name in names})  # one bank build
        if errors:
            raise SystemExit(f"IAPT adapters failed to load: {errors}")
        adapter_bytes = sum(t.numel() * t.element_size() for layer in engine.bank.layers for t in layer.values())
    elif kind == "peft":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base, str(work / "lora" / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(work / "lora" / name), adapter_name=name)
        peft_model.eval()
        adapter_bytes = sum(p.numel() * p.element_size() for k, p in peft_model.named_parameters() if "lora_" in k)
    elif kind == "gather":
        gather = GatherLoRA(base, [work / "lora" / name for name in names], base.dtype, base.device)
        adapter_bytes = gather.nbytes()
    sync()
    t_load = time.perf_counter() - t_load
    gc.collect()
    rss_adapters = (proc_status_kib("VmRSS") or 0) * 1024
    # The peak counts from here: resident adapters + serving, not the transient copies made while loading them.
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_hwm()

    def run(scheduler: str, tenants: list[int], a: argparse.Namespace, ps: list[list[int]]) -> dict[str, Any]:
        if scheduler == "engine":
            if kind == "iapt":
                return run_engine(a, engine, ps, [names[t] for t in tenants])
            if kind == "bare":
                return run_engine(a, engine, ps, [None] * len(ps))
            return run_engine(
                a,
                engine,
                ps,
                [None] * len(ps),
                rows_of=lambda reqs: gather.set_rows(None if reqs is None else [r.bench_tag for r in reqs]),
                tags=[t + 1 for t in tenants],
            )
        if kind == "bare":
            return run_static(a, base.generate, ps, tenants, lambda ts: {}, pad)
        if kind == "peft":
            return run_static(
                a, peft_model.generate, ps, tenants, lambda ts: {"adapter_names": [names[t] for t in ts]}, pad
            )
        if kind == "gather":

            def before(ts: list[int]) -> dict[str, Any]:
                gather.set_rows([t + 1 for t in ts])
                return {}

            try:
                return run_static(a, base.generate, ps, tenants, before, pad)
            finally:
                gather.set_rows(None)
        raise ValueError(f"{kind} has no {scheduler} runs")

    reply(
        {
            "ready": True,
            "backbone_s": t_backbone,
            "adapters_load_s": t_load,
            "adapter_bytes": adapter_bytes,
            "mem_base_bytes": mem_base,
            "mem_method": mem_method,
            "rss_after_adapters": rss_adapters,
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            a, ps, tenants = args, prompts, cmd["tenants"]
            if cmd.get("warmup"):  # one batch, a few tokens: pages weights in, warms the allocator and kernels
                a = argparse.Namespace(**{**vars(args), "new_tokens": min(4, args.new_tokens)})
                ps, tenants = prompts[: args.max_batch_size], tenants[: args.max_batch_size]
            with torch.no_grad(), CpuMeter() as meter:
                result = run(cmd["scheduler"], tenants, a, ps)
            result["foreign"] = meter.foreign
            if not cmd.get("tokens"):
                result.pop("tokens")
            reply(result)
        elif cmd["cmd"] == "check_iapt":  # engine output == IAPTModel.generate of each request alone
            from iapt import IAPTModel

            out = []
            for i, t in zip(cmd["requests"], cmd["tenants"], strict=True):
                model = IAPTModel.from_pretrained(base, work / "iapt" / names[t])
                try:
                    ids = torch.tensor([prompts[i]], device=args.device)
                    gen = model.generate(ids, attention_mask=torch.ones_like(ids), **_gen_kwargs(args, pad))
                finally:
                    model.unload()
                out.append(gen[0, args.prompt_len :].tolist())
            reply({"tokens": out})
        elif cmd["cmd"] == "finish":
            if cuda:
                peak = torch.cuda.max_memory_allocated()
            else:
                import resource

                hwm = proc_status_kib("VmHWM")
                peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            reply({"peak_mem_bytes": peak - mem_base})
            return
        else:
            raise ValueError(f"unknown command {cmd!r}")


def _worker(args: argparse.Namespace, method: str, n: int, log_dir: str) -> WorkerProcess:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "method",
        "--method",
        method,
        "--n",
        str(n),
        "--workdir",
        args.workdir,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--max-batch-size",
        str(args.max_batch_size),
        "--new-tokens",
        str(args.new_tokens),
        "--prompt-len",
        str(args.prompt_len),
        "--engine-mode",
        args.engine_mode,
    ]
    return WorkerProcess(cmd, method, Path(log_dir) / f"{method}-{n}.log", args.threads)


def _subprocess(args: argparse.Namespace, worker: str) -> None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        worker,
        "--workdir",
        args.workdir,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--requests",
        str(args.requests),
        "--prompt-len",
        str(args.prompt_len),
        "--bottleneck",
        str(args.bottleneck),
        "--soft-tokens",
        str(args.soft_tokens),
        "--lora-rank",
        str(args.lora_rank),
        "--iapt-std",
        str(args.iapt_std),
        "--lora-std",
        str(args.lora_std),
        "--threads",
        str(args.threads),
        "--tenants",
        *map(str, args.tenants),
    ]
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------ the parent
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(run: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    R = len(run["latency"])
    return {
        "wall": run["wall"],
        "prefill": run["prefill"],
        "decode": run["decode"],
        "decode_tok_s": R * (args.new_tokens - 1) / run["decode"],
        "total_tok_s": R * args.new_tokens / run["wall"],
        "req_s": R / run["wall"],
        "p50": _percentile(run["latency"], 50),
        "p99": _percentile(run["latency"], 99),
        "ttft_p50": _percentile(run["ttft"], 50),
        "foreign": run["foreign"],
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    meta = json.loads((Path(args.workdir) / "meta.json").read_text())
    R = args.requests
    results: dict[str, Any] = {
        "meta": {k: v for k, v in meta.items() if k != "prompts"},
        "cells": {},
        "workers": {},
        "checks": [],
        "schedules": {},
    }
    with tempfile.TemporaryDirectory() as log_dir:
        for n in args.tenants:
            traces = {k: tenant_trace(R, n, k, args.seed) for k in _trace_kinds(args, n)}
            results["traces"] = results.get("traces", {})
            results["traces"][str(n)] = {
                k: {"distinct_per_batch": _distinct_per_batch(v, args.max_batch_size)} for k, v in traces.items()
            }
            t_spawn = time.perf_counter()
            workers = {m: _worker(args, m, n, log_dir) for m in WORKERS}
            try:
                for m, w in workers.items():
                    results["workers"][f"{m}/{n}"] = w.ask(None)
                _log(
                    f"[N={n}] workers ready in {time.perf_counter() - t_spawn:.0f} s (adapter loading: "
                    + ", ".join(f"{m} {results['workers'][f'{m}/{n}']['adapters_load_s']:.1f} s" for m in WORKERS)
                    + ")"
                )
                cells = []  # (row key, trace kind); the bare rows once (they ignore the trace)
                for key, _, _scheduler, worker in ROWS:
                    for kind in ["any"] if worker == "bare" else traces:
                        cells.append((key, kind))
                # warm-up: every cell once, untimed (first calls allocate, pick kernels, page in weights)
                if args.warmup:
                    for key, kind in cells:
                        worker, scheduler = key.split("/")
                        workers[worker].ask(
                            {
                                "cmd": "run",
                                "scheduler": scheduler,
                                "warmup": True,
                                "tenants": traces.get(kind, traces["uniform"]),
                            }
                        )
                for rep in range(args.repeats):
                    shift = (rep * 3 + args.tenants.index(n)) % len(cells)
                    order = cells[shift:] + cells[:shift]
                    for key, kind in order:
                        worker, scheduler = key.split("/")
                        tenants = traces.get(kind, traces["uniform"])
                        want_tokens = args.check and rep == 0
                        results["waited"] = results.get("waited", 0.0) + wait_quiet(0.15, args.wait_quiet, window=1.0)
                        run = workers[worker].ask(
                            {"cmd": "run", "scheduler": scheduler, "tenants": tenants, "tokens": want_tokens}
                        )
                        s = _summary(run, args)
                        s["round"] = rep
                        results["cells"].setdefault(f"{key}|{n}|{kind}", []).append(s)
                        results["schedules"][f"{key}|{n}|{kind}"] = run["schedule"]
                        if want_tokens:
                            results.setdefault("tokens", {})[f"{key}|{n}|{kind}"] = run["tokens"]
                        _log(
                            f"[N={n} round {rep + 1}] {key:14s} {kind:9s} decode {s['decode_tok_s']:6.1f} tok/s, "
                            f"prefill {s['prefill']:.2f} s, wall {s['wall']:.2f} s, others' CPU {s['foreign']:.0%}"
                        )
                if args.check:
                    k = min(R, args.check_requests)
                    tenants = traces["uniform"]
                    ref = workers["iapt"].ask(
                        {"cmd": "check_iapt", "requests": list(range(k)), "tenants": tenants[:k]}
                    )["tokens"]
                    results["checks"] += _checks(results["tokens"], n, traces, ref)
                for m, w in workers.items():
                    results["workers"][f"{m}/{n}"].update(w.ask({"cmd": "finish"}))
            finally:
                for w in workers.values():
                    w.close()
            results.pop("tokens", None)
    return results


def _checks(tokens: dict[str, Any], n: int, traces: dict[str, list[int]], iapt_ref: list[list[int]]) -> list[dict]:
    """Token-for-token agreement between methods that must agree (greedy, float): one dict per check."""
    out = []

    def same(name: str, a: list[list[int]], b: list[list[int]]) -> None:
        rows = sum(x == y for x, y in zip(a, b, strict=True))
        out.append({"check": f"N={n}: {name}", "rows_equal": rows, "rows": len(a), "ok": rows == len(a)})

    def differ(name: str, a: list[list[int]], b: list[list[int]]) -> None:
        rows = sum(x != y for x, y in zip(a, b, strict=True))
        out.append({"check": f"N={n}: {name}", "rows_differing": rows, "rows": len(a), "ok": rows > 0})

    same("bare engine == bare generate", tokens[f"bare/engine|{n}|any"], tokens[f"bare/static|{n}|any"])
    k = len(iapt_ref)
    same(
        f"IAPT engine == IAPTModel.generate of the request alone (first {k} requests, uniform)",
        tokens[f"iapt/engine|{n}|uniform"][:k],
        iapt_ref,
    )
    for kind in traces:
        same(
            f"gather-LoRA static == PEFT LoRA static ({kind})",
            tokens[f"gather/static|{n}|{kind}"],
            tokens[f"peft/static|{n}|{kind}"],
        )
        same(
            f"gather-LoRA engine == PEFT LoRA static ({kind})",
            tokens[f"gather/engine|{n}|{kind}"],
            tokens[f"peft/static|{n}|{kind}"],
        )
        differ(
            f"IAPT output differs from bare ({kind})", tokens[f"iapt/engine|{n}|{kind}"], tokens[f"bare/engine|{n}|any"]
        )
        differ(
            f"LoRA output differs from bare ({kind})", tokens[f"peft/static|{n}|{kind}"], tokens[f"bare/static|{n}|any"]
        )
    return out


def _schedule_check(results: dict[str, Any], args: argparse.Namespace) -> tuple[bool, str]:
    """Engine schedules equal static batches: prefill batch sizes and decode step counts."""
    R, B = args.requests, args.max_batch_size
    static = [min(B, R - s) for s in range(0, R, B)]
    steps = len(static) * (args.new_tokens - 1)
    bad = [k for k, v in results["schedules"].items() if v["prefill_batches"] != static or v["decode_steps"] != steps]
    return not bad, f"prefill batches {static}, {steps} decode steps" + (f"; differs: {bad}" if bad else "")


# ------------------------------------------------------------------------------------------- report
def _best(samples: list[dict[str, float]]) -> dict[str, float]:
    return min(samples, key=lambda s: s["wall"])


def render(args: argparse.Namespace, results: dict[str, Any]) -> tuple[str, list[str]]:
    mib = 1024 * 1024
    cells = results["cells"]
    lines = [
        (
            "| N | trace | method | scheduler | decode tok/s | × bare (same sched.) | × PEFT LoRA | "
            "× gather-LoRA static | × gather-LoRA engine | prefill s | total tok/s | req/s | p50 / p99 latency s | "
            "TTFT p50 s | peak mem MiB (adapters) | others' CPU |"
        ),
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets: list[str] = []
    target_bare, target_lora = [], []
    for n in args.tenants:
        kinds = _trace_kinds(args, n)
        for kind in kinds:
            best = {}
            for key, *_ in ROWS:
                ck = f"{key}|{n}|{'any' if key.startswith('bare') else kind}"
                if ck in cells:
                    best[key] = _best(cells[ck])
            for key, method, scheduler, worker in ROWS:
                if key.startswith("bare") and kind != kinds[0]:
                    continue
                b = best[key]
                bare = best[f"bare/{scheduler}"]
                vs = {
                    other: (f"{b['decode_tok_s'] / best[other]['decode_tok_s']:.2f}" if other != key else "1")
                    for other in LORA_ROWS
                }
                w = results["workers"][f"{worker}/{n}"]
                samples = cells[f"{key}|{n}|{'any' if key.startswith('bare') else kind}"]
                trace = "—" if key.startswith("bare") else kind.replace(":", " s=")
                sched = (
                    "engine (continuous)"
                    if scheduler == "engine" and args.engine_mode == "continuous"
                    else ("engine (chunks)" if scheduler == "engine" else "static (HF generate)")
                )
                lines.append(
                    f"| {n} | {trace} | {method} | {sched} | {b['decode_tok_s']:.1f} | "
                    f"{b['decode_tok_s'] / bare['decode_tok_s']:.2f} | {vs['peft/static']} | "
                    f"{vs['gather/static']} | {vs['gather/engine']} | {b['prefill']:.2f} | "
                    f"{b['total_tok_s']:.1f} | {b['req_s']:.2f} | {b['p50']:.2f} / {b['p99']:.2f} | "
                    f"{b['ttft_p50']:.2f} | {w['peak_mem_bytes'] / mib:,.0f} ({w['adapter_bytes'] / mib:,.1f}) | "
                    f"{max(s['foreign'] for s in samples):.0%} |"
                )
            # targets, with paired per-round ratios too
            iapt_cell = cells[f"iapt/engine|{n}|{kind}"]
            bare_cell = cells[f"bare/engine|{n}|any"]
            best_ratio = best["iapt/engine"]["decode_tok_s"] / best["bare/engine"]["decode_tok_s"]
            paired = statistics.median(i["decode_tok_s"] / b["decode_tok_s"] for i, b in zip(iapt_cell, bare_cell))
            target_bare.append((n, kind, best_ratio, paired))
            if n == 16 or (16 not in args.tenants and n == max(args.tenants)):
                lora_key = max(LORA_ROWS, key=lambda k: best[k]["decode_tok_s"])
                lr = best["iapt/engine"]["decode_tok_s"] / best[lora_key]["decode_tok_s"]
                lora_cell = cells[f"{lora_key}|{n}|{kind}"]
                paired_l = statistics.median(
                    i["decode_tok_s"] / x["decode_tok_s"] for i, x in zip(iapt_cell, lora_cell)
                )
                target_lora.append((n, kind, lora_key, lr, paired_l))
    for n, kind, r, p in target_bare:
        targets.append(
            f"- IAPT ≥ 0.95× bare decode tok/s (both on the engine), N={n}, {kind}: best {r:.3f}, "
            f"median paired {p:.3f} → **{'PASS' if r >= 0.95 else 'MISS'}**"
        )
    for n, kind, key, r, p in target_lora:
        targets.append(
            f"- IAPT ≥ 1.3× the best LoRA decode tok/s at N={n}, {kind} (best LoRA: {key}): best {r:.3f}, "
            f"median paired {p:.3f} → **{'PASS' if r >= 1.3 else 'MISS'}**"
        )
    if 16 not in args.tenants:
        targets.append("- (N = 16 was not run: the LoRA target is shown at the largest N run instead)")
    return "\n".join(lines), targets


def _machine(args: argparse.Namespace) -> str:
    import peft
    import transformers

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
    return (
        f"{args.device} ({device}, {os.cpu_count()} CPUs), {args.dtype}, "
        f"{args.threads if args.threads > 0 else torch.get_num_threads()} threads per process, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", help="backbone dtype: float32, bfloat16, float16")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per process (0 = torch's default). 1 by default: on a shared "
        "machine a 2-thread OpenMP team whose second core is taken by another job slows down "
        "~50x (measured here); on a dedicated machine use all its cores",
    )
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 4, 16, 64], help="the N values")
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="R, requests per trace (16 = one batch of 16: the default set fits ~10 min on 2 cores)",
    )
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (exact)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (exact)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per batch, every scheduler")
    parser.add_argument(
        "--engine-mode",
        choices=("continuous", "chunks"),
        default="continuous",
        help="engine rows: the whole trace at once (continuous batching) or max-batch-size at a time",
    )
    parser.add_argument("--zipf-s", type=float, default=1.2, help="exponent of the skewed trace")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (each cell once per round)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up round")
    parser.add_argument("--bottleneck", type=int, default=32, help="IAPT bottleneck r")
    parser.add_argument("--soft-tokens", type=int, default=4, help="IAPT soft tokens n per layer")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = IAPT's parameter budget)")
    parser.add_argument("--iapt-std", type=float, default=0.02, help="std of the random IAPT up-projections")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random LoRA B matrices")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each timed run, wait up to this many seconds for other processes to use "
        "≤ 15%% of the machine (shared machines)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="assert the token-for-token equivalences (see above)")
    parser.add_argument("--check-requests", type=int, default=3, help="requests checked against IAPTModel.generate")
    parser.add_argument("--workdir", default=None, help="where adapters go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write every raw measurement to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker == "setup":
        setup_worker(args)
        return 0
    if args.worker == "method":
        method_worker(args)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the workers

    started = time.perf_counter()
    load_before = os.getloadavg()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="iapt-multitenant-")
        args.workdir = tmp.name
    try:
        t = time.perf_counter()
        _subprocess(args, "setup")
        _log(
            f"[setup] {max(args.tenants)} IAPT + {max(args.tenants)} LoRA adapters and {args.requests} prompts in "
            f"{time.perf_counter() - t:.0f} s"
        )
        results = benchmark(args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started

    meta = results["meta"]
    table, targets = render(args, results)
    sched_ok, sched_text = _schedule_check(results, args)
    mem_method = next(iter(results["workers"].values()))["mem_method"]
    traces = "; ".join(
        f"N={n}: " + ", ".join(f"{k} {v['distinct_per_batch']:.1f}" for k, v in d.items())
        for n, d in results["traces"].items()
    )
    notes = [
        (
            f"- Trace: R={args.requests} requests, all arriving at t=0; prompts exactly {args.prompt_len} tokens "
            f"(chat-templated instructions), {args.new_tokens} new tokens each (greedy, EOS ignored); max batch "
            f"{args.max_batch_size} for every scheduler. Distinct tenants per batch of {args.max_batch_size} "
            f"(arrival order): {traces}."
        ),
        (
            f"- Adapters: IAPT r={args.bottleneck}, n={args.soft_tokens} at every layer = "
            f"{meta['iapt_params']:,} params; LoRA q_proj,v_proj rank {meta['lora_rank']} = "
            f"{meta['lora_params']:,} params (closest to IAPT's budget); "
            f"all random, non-zero."
        ),
        (
            f"- Engine schedule {'equals' if sched_ok else 'DIFFERS from'} static batching for every engine run "
            f"({sched_text}); engine mode: {args.engine_mode}."
        ),
        (
            f"- decode tok/s = R×({args.new_tokens}−1) / (wall − prefill); prefill = engine: time in the prefill "
            f"forward passes; static: generate start → first token, summed over batches. "
            f"total tok/s = R×{args.new_tokens} / wall. Latency = finish − arrival (t=0). "
            f"Best of {args.repeats} interleaved rounds per cell"
            f"{' after an untimed warm-up per cell (first batch, 4 new tokens)' if args.warmup else ''}; "
            "ratios are of decode tok/s."
        ),
        (
            f"- Memory: {mem_method}; one process per method and N (bare and gather-LoRA serve both schedulers in one "
            f"process, so their peak covers both); (adapters) = exact bytes of the adapter tensors held "
            f"(IAPT: the engine's stacked bank)."
        ),
        (
            f"- Machine: {_machine(args)}; load average {load_before[0]:.2f} → {load_after[0]:.2f} (1 min); "
            f"{date}; {elapsed:.0f} s in all, {results.get('waited', 0.0):.0f} s of it waiting for other processes "
            f"(--wait-quiet {args.wait_quiet:g})."
        ),
    ]
    if results["checks"]:
        notes.append(
            "- Checks (--check): "
            + "; ".join(
                f"{c['check']}: {c.get('rows_equal', c.get('rows_differing'))}/{c['rows']} "
                f"{'rows equal' if 'rows_equal' in c else 'rows differ'} {'✓' if c['ok'] else '✗'}"
                for c in results["checks"]
            )
        )
    print(table)
    print()
    print("\n".join(targets))
    print()
    print("\n".join(notes))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"args": vars(args), "results": results, "table": table, "targets": targets, "notes": notes}, indent=1
            )
        )
    failed = [c for c in results["checks"] if not c["ok"]]
    if args.check and (failed or not sched_ok):
        _log(f"CHECK FAILED: {[c['check'] for c in failed]}" + ("" if sched_ok else f"; schedule: {sched_text}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
