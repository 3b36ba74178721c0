"""Multi-tenant serving on vLLM: the traces of ``multitenant.py`` served by vLLM bare, vLLM + IAPT (the
``iapt.vllm`` plugin), vLLM's native multi-LoRA at IAPT's parameter budget (q/v, and all-linear: the
configuration most users run), and the project's built-in engine (bare and IAPT), in one run.

    row              model class                         each request's adapter
    vllm bare        vLLM's own (LlamaForCausalLM)       none
    vllm IAPT        iapt.vllm's IAPT subclass           its tenant's IAPT adapter (header in front of the prompt)
    vllm LoRA q/v    vLLM's own, enable_lora             its tenant's LoRA on q_proj, v_proj (LoRARequest)
    vllm LoRA all    vLLM's own, enable_lora             its tenant's LoRA on every linear layer
    engine bare      iapt.serving.Engine                 none
    engine IAPT      iapt.serving.Engine                 its tenant's IAPT adapter
    vllm bare / IAPT, 2nd engine                         a second engine of the same kind (``--rows``, not run
                                                         by default): how far two engines of one kind differ

Adapters are random and non-zero, as in ``multitenant.py``: IAPT at ``--bottleneck`` (default r = 32, n = 4),
LoRA at the rank whose parameter count comes closest to IAPT's (q/v: ``iapt.methods.size_for_budget``;
all-linear: the same rule over the seven projections). vLLM pads every LoRA to ``max_lora_rank`` (one of
1, 8, 16, 32, 64, ...): that cost is vLLM's and is part of what is measured.

Each row runs in a process of its own that builds its engine once, with all max(N) adapters (IAPT: in the bank;
LoRA: ``max_loras`` = min(max(N), --max-num-seqs) slots, ``max_cpu_loras`` = max(N)), and runs an untimed
warm-up. All rows' engines stay alive together (idle ones wait on a pipe and take no CPU); the runs are
**interleaved**: one round runs every (N, trace) cell (uniform; Zipf(s)) once on every row, the rows of a cell
back to back, in an order that rotates from cell to cell and round to round, for ``--repeats`` rounds. Each
ratio to bare vLLM is taken within a round (the two runs seconds apart) and the table shows its median over
rounds with the range, so the drift of a shared machine between minutes cancels: rows measured one after the
other drifted ±10% here. Every run records the share of the machine's CPU taken by processes outside its row.
Absolute numbers are the best run per cell (contention only slows a run down). All requests arrive at t = 0
(``add_request`` for all, then ``LLMEngine.step`` until done); every request gets exactly ``--new-tokens``
greedy tokens (EOS ignored).

Measured per run:
  prefill s      the summed wall time of the engine steps in which some request got its first token
                 (vLLM mixes prefills into decode steps; such a step counts as prefill).
  decode tok/s   tokens emitted in the other steps / their summed wall time.
  total tok/s    R × new tokens / wall.
  TTFT, p50/p99  per request, first token / finish time − t0.
  peak RSS       vLLM: the largest VmHWM of the row's vLLM processes (the model worker: weights, the KV cache it
                 allocates up front, VLLM_CPU_KVCACHE_SPACE = 1 GiB, and activations; GiB);
                 engine: the worker's own VmHWM.
Ratios are against ``vllm bare`` at the same N and trace and the same settings (each row says when it ran).

``--out FILE`` keeps the results after every round (atomically); run again with the same settings and only
rows short of ``--repeats`` rounds are measured (bare vLLM always joins, so each round has its own reference):
a long matrix resumes, and slow rows (LoRA on the CPU build) can be measured in a window of their own. Settings
that change the numbers must match (``SETTINGS``), else the script refuses.

vLLM's CPU build runs LoRA through pure-PyTorch gather ops (``vllm/lora/ops/torch_ops``: each token's A and B
gathered and multiplied; ~56% of the LoRA engine's time in ``bgmv_shrink`` / ``bgmv_expand_slice`` in a
py-spy sample), not the Punica kernels of its GPU build: on CPU the LoRA rows measure that implementation.

``--check``: the IAPT row's greedy tokens for the first ``--check-requests`` requests of every cell equal the
built-in engine's (which the project's tests hold equal to offline ``IAPTModel.generate``), and the adapters
change the output.

Runs in the vLLM environment (``scripts/setup_vllm.sh``)::

    .venv-vllm/bin/python benchmarks/vllm_multitenant.py                       # CPU, SmolLM2-135M, float32
    .venv-vllm/bin/python benchmarks/vllm_multitenant.py --tenants 1 16 --requests 32 --repeats 1
    .venv-vllm/bin/python benchmarks/vllm_multitenant.py --rows vllm-bare vllm-lora-all --tenants 16 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import CpuMeter, WorkerProcess, proc_status_kib, worker_channel
from multitenant import _percentile, build_prompts, run_engine, tenant_trace

from iapt.io import atomic_write_text
from iapt.vllm.lora import LORA_TARGETS, lora_rank_limit

ROWS = [
    "vllm-bare",
    "vllm-iapt",
    "vllm-lora-qv",
    "vllm-lora-all",
    "engine-bare",
    "engine-iapt",
    "vllm-bare-2",
    "vllm-iapt-2",
]
LABELS = {
    "vllm-bare": "vllm bare",
    "vllm-iapt": "vllm IAPT",
    "vllm-lora-qv": "vllm LoRA q/v",
    "vllm-lora-all": "vllm LoRA all-linear",
    "engine-bare": "engine bare",
    "engine-iapt": "engine IAPT",
    "vllm-bare-2": "vllm bare, 2nd engine",
    "vllm-iapt-2": "vllm IAPT, 2nd engine",
}
ALL_LINEAR = list(LORA_TARGETS)  # every projection vLLM's LoRA layers wrap
# What a row's numbers depend on: rows in one --out file were all measured with these equal.
SETTINGS = (
    "model",
    "dtype",
    "tenants",
    "requests",
    "prompt_len",
    "new_tokens",
    "max_num_seqs",
    "zipf_s",
    "repeats",
    "bottleneck",
    "soft_tokens",
    "threads",
    "enforce_eager",
    "seed",
)


def _traces(args: argparse.Namespace, n: int) -> list[str]:
    return ["uniform"] if n == 1 else ["uniform", f"zipf:{args.zipf_s}"]


# -------------------------------------------------------------------------------------------- setup
def _lora_rank_all_linear(base: torch.nn.Module, budget: int) -> tuple[int, int]:
    """The all-linear LoRA rank closest to ``budget`` parameters, and its count."""
    per_rank = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ALL_LINEAR:
            per_rank += module.in_features + module.out_features
    rank = max(1, round(budget / per_rank))
    return rank, rank * per_rank


def _save_loras(base: torch.nn.Module, rank: int, targets: list[str], folder: Path, count: int, seed: int) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for t in range(count):
        torch.manual_seed(seed * 1000 + 500 + t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(p, a=5**0.5)
                elif "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
        model.save_pretrained(str(folder / f"t{t:03d}"))
    model.unload()
    return params


def setup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prompts and max(N) adapters of each kind under ``work``; what they are, in meta.json."""
    from iapt import IAPTConfig, get_iapt_model
    from iapt.methods import count_for, size_for_budget
    from iapt.models import load_model
    from iapt.vllm.engine import model_folder

    torch.manual_seed(args.seed)
    base, tokenizer = load_model(args.model, dtype="float32")
    count = max(args.tenants)
    iapt_params = count_for("iapt", base, args.bottleneck)
    model = get_iapt_model(base, IAPTConfig(bottleneck=args.bottleneck, num_soft_tokens=args.soft_tokens))
    for t in range(count):
        torch.manual_seed(args.seed * 1000 + t)
        with torch.no_grad():
            for gen in model.generators.values():
                gen.reset_parameters()
                torch.nn.init.normal_(gen.up.weight, std=0.02)
                torch.nn.init.normal_(gen.up.bias, std=0.02)
        model.save_pretrained(work / "iapt" / f"t{t:03d}")
    base = model.unload()
    qv_rank = size_for_budget("lora", base, iapt_params)
    all_rank, _ = _lora_rank_all_linear(base, iapt_params)
    meta = {
        "model_folder": model_folder(args.model),
        "prompts": build_prompts(tokenizer, args.requests, args.prompt_len),
        "iapt_params": iapt_params,
        "lora_qv_rank": qv_rank,
        "lora_qv_params": _save_loras(base, qv_rank, ["q_proj", "v_proj"], work / "lora-qv", count, args.seed),
        "lora_all_rank": all_rank,
        "lora_all_params": _save_loras(base, all_rank, ALL_LINEAR, work / "lora-all", count, args.seed),
    }
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------------------------- workers
def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds user + system) of every process (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            continue
    return stats


def _descendants(root: int, stats: dict[int, tuple[int, float]]) -> set[int]:
    """The pids below ``root`` (children, grandchildren, ...), not ``root`` itself."""
    mine: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier} - mine
        mine |= frontier
    return mine


def _child_hwm_gib() -> float | None:
    """The largest VmHWM among this process's descendants, GiB: vLLM's engine core and its model worker (the
    worker, a grandchild, holds the weights and the KV cache)."""
    peaks = []
    for pid in _descendants(os.getpid(), _proc_stats()):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        peaks += [int(line.split()[1]) for line in lines if line.startswith("VmHWM:")]
    return max(peaks) / 2**20 if peaks else None


def _own_hwm_gib() -> float:
    return (proc_status_kib("VmHWM") or 0) / 2**20


class VLLMRow:
    """One vLLM engine serving a row's requests; ``run`` times a trace through ``LLMEngine.step``."""

    def __init__(self, args: argparse.Namespace, row: str, work: Path, meta: dict[str, Any]) -> None:
        from vllm import EngineArgs, LLMEngine

        self.row, self.work, self.args = row, work, args
        count = max(args.tenants)
        kwargs: dict[str, Any] = {
            "model": meta["model_folder"],
            "dtype": args.dtype,
            "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.prompt_len + args.new_tokens + 64,
            "enable_prefix_caching": False,
            "enable_chunked_prefill": False,
            "enforce_eager": args.enforce_eager,
            "seed": args.seed,
        }
        self.serving = None
        if row == "vllm-iapt":
            from iapt.vllm.serving import IAPTServing

            adapters = {f"t{t:03d}": work / "iapt" / f"t{t:03d}" for t in range(count)}
            self.serving = IAPTServing(meta["model_folder"], adapters)
            kwargs = self.serving.engine_args(**{k: v for k, v in kwargs.items() if k != "model"})
        elif row.startswith("vllm-lora"):
            rank = meta["lora_qv_rank" if row == "vllm-lora-qv" else "lora_all_rank"]
            kwargs.update(
                enable_lora=True,
                max_lora_rank=lora_rank_limit(rank),
                max_loras=min(count, args.max_num_seqs),
                max_cpu_loras=count,
            )
        self.engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        self._ids = 0

    def run(self, prompts: list[list[int]], tenants: list[int] | None) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=self.args.new_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        folder = {"vllm-lora-qv": "lora-qv", "vllm-lora-all": "lora-all"}.get(self.row)
        order: dict[str, int] = {}
        for i, ids in enumerate(prompts):
            self._ids += 1
            rid = f"r{self._ids}"
            order[rid] = i
            tenant = None if tenants is None else tenants[i]
            lora = None
            if self.serving is not None and tenant is not None:
                prompt: Any = self.serving.prompt(ids, f"t{tenant:03d}")
            else:
                prompt = {"prompt_token_ids": list(ids)}
                if folder is not None and tenant is not None:
                    lora = LoRARequest(f"t{tenant:03d}", tenant + 1, str(self.work / folder / f"t{tenant:03d}"))
            self.engine.add_request(rid, prompt, params, lora_request=lora)
        R = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(R)]
        ttft, latency = [0.0] * R, [0.0] * R
        prefill = decode = 0.0
        decode_tokens = 0
        t0 = time.perf_counter()
        while self.engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = self.engine.step()
            now = time.perf_counter()
            first, emitted = False, 0
            for out in outputs:
                i = order[out.request_id]
                new = list(out.outputs[0].token_ids) if out.outputs else []
                if new and not tokens[i]:
                    ttft[i], first = now - t0, True
                tokens[i] += new
                emitted += len(new)
                if out.finished:
                    latency[i] = now - t0
            if first:
                prefill += now - start
            else:
                decode += now - start
                decode_tokens += emitted
        wall = time.perf_counter() - t0
        return _summary(wall, prefill, decode, decode_tokens, ttft, latency, tokens, self.args) | {
            "peak_gib": _child_hwm_gib()
        }


class EngineRow:
    """The built-in engine (``iapt.serving.Engine``) on the same trace, timed as ``multitenant.py`` does."""

    def __init__(self, args: argparse.Namespace, row: str, work: Path, meta: dict[str, Any]) -> None:
        from iapt.models import load_model
        from iapt.serving import Engine

        self.args, self.row = args, row
        base, tokenizer = load_model(args.model, dtype=args.dtype)
        adapters = work / "iapt" if row == "engine-iapt" else None
        self.engine = Engine(base.eval(), tokenizer, adapters_dir=adapters, max_batch_size=args.max_num_seqs)

    def run(self, prompts: list[list[int]], tenants: list[int] | None) -> dict[str, Any]:
        timing = argparse.Namespace(
            device="cpu", engine_mode="all", new_tokens=self.args.new_tokens, max_batch_size=self.args.max_num_seqs
        )
        adapters = [None if tenants is None else f"t{t:03d}" for t in (tenants or [0] * len(prompts))]
        run = run_engine(timing, self.engine, prompts, adapters)
        decode_tokens = len(prompts) * (self.args.new_tokens - 1)
        return _summary(
            run["wall"],
            run["prefill"],
            run["decode"],
            decode_tokens,
            run["ttft"],
            run["latency"],
            run["tokens"],
            self.args,
        ) | {"peak_gib": _own_hwm_gib()}


def _summary(
    wall: float,
    prefill: float,
    decode: float,
    decode_tokens: int,
    ttft: list[float],
    latency: list[float],
    tokens: list[list[int]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    short = [i for i, t in enumerate(tokens) if len(t) != args.new_tokens]
    if short:
        raise RuntimeError(f"{len(short)} requests did not get {args.new_tokens} tokens (first: {short[0]})")
    R = len(tokens)
    return {
        "wall": wall,
        "prefill_s": prefill,
        "decode_tok_s": decode_tokens / decode if decode > 0 else 0.0,
        "total_tok_s": R * args.new_tokens / wall,
        "ttft_mean": statistics.mean(ttft),
        "p50": _percentile(latency, 50),
        "p99": _percentile(latency, 99),
        "tokens": tokens[: args.check_requests],
    }


def _tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its descendants: a vLLM row's work is in its engine core."""
    stats = _proc_stats()
    return sum(stats[pid][1] for pid in _descendants(root, stats) | {root} if pid in stats)


def worker(args: argparse.Namespace) -> None:
    """One row's engine in a process of its own, driven one JSON line at a time (``machine.WorkerProcess``):
    built and warmed up at start (answers ``{"ready"}``), then ``{"n", "trace"}`` runs that cell once and
    answers its numbers, with the share of the machine's CPU that processes outside this row took meanwhile."""
    reply = worker_channel()  # what libraries print goes to the log, not into the protocol

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    meta = json.loads((work / "meta.json").read_text())
    prompts = meta["prompts"]
    started = time.perf_counter()
    kind = args.worker.removesuffix("-2")  # a second engine of the same kind: the spread between engines
    row = (VLLMRow if kind.startswith("vllm") else EngineRow)(args, kind, work, meta)
    bare = kind.endswith("bare")
    warm = min(len(prompts), args.max_num_seqs)
    row.run(prompts[:warm], None if bare else [t % max(args.tenants) for t in range(warm)])  # untimed
    reply({"ready": True, "build_s": time.perf_counter() - started})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "finish":
            return
        tenants = None if bare else tenant_trace(len(prompts), cmd["n"], cmd["trace"], args.seed)
        busy0, tree0, t0 = CpuMeter._busy_s(), _tree_cpu_s(os.getpid()), time.perf_counter()
        result = row.run(prompts, tenants)
        busy1, tree1, wall = CpuMeter._busy_s(), _tree_cpu_s(os.getpid()), time.perf_counter() - t0
        foreign = 0.0
        if busy0 is not None and busy1 is not None:
            foreign = max(0.0, ((busy1 - busy0) - (tree1 - tree0)) / (wall * (os.cpu_count() or 1)))
        reply(result | {"foreign": foreign})


# ------------------------------------------------------------------------------------------- report
def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["total_tok_s"])


def paired_ratios(runs: list[dict[str, Any]], bare: list[dict[str, Any]], field: str) -> list[float]:
    """``field`` of each run over bare's in the same round (rows of one round ran within a minute of each
    other, so drift between rounds cancels); runs without a round (an older results file) pair best with best."""
    by_round = {b["round"]: b for b in bare if "round" in b}
    ratios = [r[field] / by_round[r["round"]][field] for r in runs if r.get("round") in by_round]
    return ratios or [_best(runs)[field] / _best(bare)[field]]


def _ratio(ratios: list[float]) -> str:
    med = statistics.median(ratios)
    return f"{med:.3f}" if len(ratios) == 1 else f"{med:.3f} [{min(ratios):.2f}–{max(ratios):.2f}]"


def render(args: argparse.Namespace, meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"IAPT r={args.bottleneck}, n={args.soft_tokens}: {meta['iapt_params']:,d} parameters; LoRA q/v rank "
        f"{meta['lora_qv_rank']} ({meta['lora_qv_params']:,d}); LoRA all-linear rank {meta['lora_all_rank']} "
        f"({meta['lora_all_params']:,d}). {args.requests} requests × {args.prompt_len} prompt tokens × "
        f"{args.new_tokens} new, max {args.max_num_seqs} running, {args.dtype}, {args.threads} thread(s).",
        "Best run per cell; × bare: the median over rounds of the ratio to bare vLLM's run of the same round "
        "[range over rounds]; others' CPU: the most that processes outside the row took during any of its runs.",
        "",
        "| N | trace | row | runs | decode tok/s | × bare | total tok/s | TTFT s | × bare | p50 s | p99 s | "
        "peak GiB | others' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.tenants:
        for trace in _traces(args, n):
            key = f"{n}/{trace}"
            bare = results["vllm-bare"]["cells"].get(key) if "vllm-bare" in results else None
            for row in args.rows:
                runs = results.get(row, {}).get("cells", {}).get(key)
                if not runs:
                    continue
                r = _best(runs)
                dx = _ratio(paired_ratios(runs, bare, "decode_tok_s")) if bare else "–"
                tx = _ratio(paired_ratios(runs, bare, "ttft_mean")) if bare else "–"
                peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "–"
                foreign = f"{max(x.get('foreign', 0.0) for x in runs):.0%}"
                lines.append(
                    f"| {n} | {trace} | {LABELS[row]} | {len(runs)} | {r['decode_tok_s']:.1f} | {dx} | "
                    f"{r['total_tok_s']:.1f} | {r['ttft_mean']:.3f} | {tx} | {r['p50']:.2f} | {r['p99']:.2f} | "
                    f"{peak} | {foreign} |"
                )
    return "\n".join(lines)


def targets(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, each with the measured median paired ratio and whether it is met."""
    out = []
    cells = [(n, t) for n in args.tenants for t in _traces(args, n)]

    def runs(row: str, key: str) -> list[dict[str, Any]] | None:
        return results.get(row, {}).get("cells", {}).get(key)

    for n, trace in cells:
        key = f"{n}/{trace}"
        iapt, bare = runs("vllm-iapt", key), runs("vllm-bare", key)
        if iapt and bare:
            d = statistics.median(paired_ratios(iapt, bare, "decode_tok_s"))
            t = statistics.median(paired_ratios(iapt, bare, "ttft_mean"))
            out.append(
                f"N={n} {trace}: IAPT decode {d:.3f}× bare ({'met' if d >= 0.97 else 'missed'}: ≥ 0.97), "
                f"TTFT {t:.3f}× bare ({'met' if t <= 1.05 else 'missed'}: ≤ 1.05)"
            )
        for twin, of in (("vllm-bare-2", "vllm-bare"), ("vllm-iapt-2", "vllm-iapt")):
            if (a := runs(twin, key)) and (b := runs(of, key)):
                r = statistics.median(paired_ratios(a, b, "decode_tok_s"))
                out.append(f"N={n} {trace}: {LABELS[twin]} decodes at {r:.3f}× the first (the spread between engines)")
        lora = runs("vllm-lora-all", key)
        if iapt and lora and n == 16:
            x = _best(iapt)["decode_tok_s"] / _best(lora)["decode_tok_s"]
            out.append(f"N=16 {trace}: IAPT decode {x:.2f}× all-linear LoRA ({'met' if x >= 1.2 else 'missed'}: ≥ 1.2)")
    return out


def checks(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    """The IAPT row equals the built-in engine on the checked requests; adapters change the output."""
    failures = []
    if "vllm-iapt" in results and "engine-iapt" in results:
        for key, runs in results["vllm-iapt"]["cells"].items():
            if runs[0]["tokens"] != results["engine-iapt"]["cells"][key][0]["tokens"]:
                failures.append(f"{key}: vllm IAPT tokens differ from the built-in engine's")
    if "vllm-iapt" in results and "vllm-bare" in results:
        key = next(iter(results["vllm-bare"]["cells"]))
        if results["vllm-iapt"]["cells"][key][0]["tokens"] == results["vllm-bare"]["cells"][key][0]["tokens"]:
            failures.append(f"{key}: the IAPT adapters did not change the output")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF folder")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--rows", nargs="+", default=ROWS[:6], choices=ROWS)
    p.add_argument("--tenants", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests running at once, every engine")
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--repeats", type=int, default=3, help="rounds: every row runs every cell once per round")
    p.add_argument("--bottleneck", type=int, default=32)
    p.add_argument("--soft-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each row (vLLM: its engine core)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="fail unless the checks above hold")
    p.add_argument("--check-requests", type=int, default=3)
    p.add_argument("--workdir", default=None, help="adapters and meta (default: a temporary folder)")
    p.add_argument(
        "--out",
        default=None,
        help="results JSON, written after every round; rows already complete in it (same settings) are not "
        "measured again",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out) if args.out else None
    settings = {k: getattr(args, k) for k in SETTINGS}
    saved: dict[str, Any] = json.loads(out.read_text()) if out is not None and out.is_file() else {}
    if saved and saved.get("settings") != settings:
        raise SystemExit(f"{out} holds rows measured with other settings ({saved.get('settings')}); use another --out")
    results: dict[str, dict[str, Any]] = dict(saved.get("results", {}))
    machine = f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        meta = setup(args, work)

        def save() -> None:
            if out is not None:
                record = {"settings": settings, "machine": machine, "meta": meta, "results": results}
                atomic_write_text(out, json.dumps(record, indent=1) + "\n")

        measure_rounds(args, argv, work, results, save)
    shown = [r for r in args.rows if r in results]
    table = render(args, meta, {r: results[r] for r in shown})
    print(f"{datetime.date.today()} · {machine} · torch {torch.__version__}\n\n{table}\n")
    for line in targets(args, results):
        print(line)
    failures = checks(args, results)
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if args.check and failures else 0


def _rounds_done(args: argparse.Namespace, result: dict[str, Any] | None) -> int:
    if not result:
        return 0
    return min(len(result["cells"].get(f"{n}/{t}", [])) for n in args.tenants for t in _traces(args, n))


def measure_rounds(
    args: argparse.Namespace,
    argv: list[str] | None,
    work: Path,
    results: dict[str, dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Every row still short of ``--repeats`` rounds, all engines alive at once, each in a process of its own;
    one round runs every (N, trace) cell on every row back to back, rows in an order that rotates from cell to
    cell and round to round, so the drift of a shared machine hits all rows alike. bare vLLM joins every
    session, so each round has its own reference. Saved after every round: a killed run keeps its rounds."""
    pending = [r for r in args.rows if _rounds_done(args, results.get(r)) < args.repeats]
    if not pending:
        for row in args.rows:
            print(f"{LABELS[row]}: measured already ({results[row]['when']})", file=sys.stderr)
        return
    if "vllm-bare" in args.rows and "vllm-bare" not in pending:
        pending.insert(0, "vllm-bare")
    rounds = args.repeats - min(_rounds_done(args, results.get(r)) for r in pending)
    env_keep = {k: os.environ.get(k) for k in ENV}
    os.environ.update({k: os.environ.get(k, v) for k, v in ENV.items()})
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--check"]
    session = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    workers: dict[str, WorkerProcess] = {}
    try:
        with tempfile.TemporaryDirectory() as logs:
            for row in pending:  # one at a time: building engines side by side would fight for the cores
                _log(f"{LABELS[row]}: building its engine ...")
                cmd = [sys.executable, __file__, *forwarded, "--worker", row, "--workdir", str(work)]
                workers[row] = WorkerProcess(cmd, row, Path(logs) / f"{row}.log", args.threads)
                ready = workers[row].ask(None)
                _log(f"{LABELS[row]}: ready in {ready['build_s']:.0f} s")
                results.setdefault(row, {"row": row, "cells": {}}).update(when=session)
            cells = [(n, t) for n in args.tenants for t in _traces(args, n)]
            for rnd in range(rounds):
                for c, (n, trace) in enumerate(cells):
                    shift = (rnd + c) % len(pending)
                    for row in pending[shift:] + pending[:shift]:
                        run = workers[row].ask({"n": n, "trace": trace}) | {"round": f"{session}/{rnd}"}
                        results[row]["cells"].setdefault(f"{n}/{trace}", []).append(run)
                        _log(
                            f"[round {rnd + 1}/{rounds}] N={n} {trace:9s} {LABELS[row]:22s} decode "
                            f"{run['decode_tok_s']:6.1f} tok/s, TTFT {run['ttft_mean']:.3f} s, "
                            f"others' CPU {run['foreign']:.0%}"
                        )
                save()
            for w in workers.values():
                w.finish({"cmd": "finish"})
    finally:
        for w in workers.values():
            w.close()
        for k, v in env_keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Environment of the row processes (``setdefault``: a value set by the caller wins).
ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
