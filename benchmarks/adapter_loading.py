"""Loading N tenants' IAPT adapters into the serving engine: time, resident memory, load peak.

Two ways in, each in its own fresh process per N (so one run's heap cannot flatter the next):

    folder    ``Engine.load_adapters({name: path, ...})`` — what ``iapt serve --adapters DIR`` does: every
              adapter is read, then the stacked bank is built once.
    one-by-one  ``Engine.load_adapter(name, path)`` N times — what N ``POST /v1/load_adapter`` calls do: each
              call copies the bank once (the bank is replaced, never edited, because a prefill may be reading it).

Reported: wall time of the loading; ``bank`` = the exact bytes of the stacked adapter tensors the engine holds
(one adapter file's size is printed for comparison); RSS growth (VmRSS after − before);
peak growth during loading (VmHWM, reset just before loading, − VmRSS before). Adapters: default IAPTConfig
(r = 32, n = 4, every layer) on the default model, random weights, written once to --work.

    python benchmarks/adapter_loading.py --counts 16 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import proc_status_kib, reset_hwm


def make_adapters(work: Path, count: int) -> list[Path]:
    import torch

    from iapt import IAPTConfig, get_iapt_model
    from iapt.models import load_model

    paths = [work / f"t{i:03d}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        base, _ = load_model("default")
        for p in missing:
            torch.manual_seed(int(p.name[1:]))
            model = get_iapt_model(base, IAPTConfig())
            with torch.no_grad():
                for g in model.generators.values():
                    torch.nn.init.normal_(g.up.weight, std=0.02)
            model.save_pretrained(p)
            model.unload()
    return paths


def worker(work: Path, count: int, how: str) -> dict:
    import torch

    from iapt.models import load_model
    from iapt.serving import Engine

    torch.set_num_threads(1)
    base, tokenizer = load_model("default")
    engine = Engine(base, tokenizer)
    paths = {f"t{i:03d}": work / f"t{i:03d}" for i in range(count)}
    rss_before = proc_status_kib("VmRSS") or 0
    reset_hwm()  # VmHWM := the current RSS
    start = time.perf_counter()
    if how == "folder":
        errors = engine.load_adapters(paths)
        assert not errors, errors
    else:
        for name, path in paths.items():
            engine.load_adapter(name, path)
    seconds = time.perf_counter() - start
    bank = sum(t.numel() * t.element_size() for layer in engine.bank.layers for t in layer.values())
    return {
        "count": count,
        "how": how,
        "seconds": seconds,
        "bank_mib": bank / 2**20,
        "rss_growth_mib": ((proc_status_kib("VmRSS") or 0) - rss_before) / 1024,
        "peak_growth_mib": ((proc_status_kib("VmHWM") or 0) - rss_before) / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", nargs="+", type=int, default=[16, 64])
    p.add_argument("--work", default="runs/adapter_loading")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.worker:
        print(json.dumps(worker(work, int(args.worker[0]), args.worker[1])))
        return
    paths = make_adapters(work, max(args.counts))
    disk = sum((q / "adapter_model.safetensors").stat().st_size for q in paths[:1]) / 2**20
    print(f"| N | how | load s | bank MiB | RSS growth MiB | load peak MiB |  (one adapter file: {disk:.2f} MiB)")
    print("|---:|---|---:|---:|---:|---:|")
    for count in args.counts:
        for how in ("folder", "one-by-one"):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--work", str(work), "--worker", str(count), how],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            print(
                f"| {count} | {how} | {r['seconds']:.2f} | {r['bank_mib']:.0f} | "
                f"{r['rss_growth_mib']:.0f} | {r['peak_growth_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
