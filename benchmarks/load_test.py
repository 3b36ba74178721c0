"""Load test of ``iapt serve`` on loopback: 32 concurrent clients against a queue of 8.

What it checks: under overload the server answers 200 or 429 (with Retry-After) and nothing else; every
request gets exactly one answer (none lost, none doubled: the clients' counts equal the server's
``iapt_requests_total`` and the engine's finished-request count); latency percentiles of the 200s; RSS before
and after. A tiny model and two tenants' adapters are built in code (no download). Bounded: 500 requests,
16 tokens each, a 10-minute deadline. Binds 127.0.0.1 only.

    python benchmarks/load_test.py [--requests 500] [--clients 32] [--queue 8]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import proc_status_kib  # noqa: E402

from iapt import IAPTConfig, get_iapt_model  # noqa: E402
from iapt.serving import Engine, create_app  # noqa: E402
from iapt.serving.app import BackgroundServer  # noqa: E402
from iapt.serving.auth import KeyRing  # noqa: E402

HOST = "127.0.0.1"  # loopback only, never another address
CHARS = [chr(c) for c in range(32, 127)]


def tiny_tokenizer():
    """A character-level tokenizer with a chat template, built in code."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=104,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = Path(tmp) / "adapters"
        for seed, name in enumerate(("alice", "bob"), start=1):
            torch.manual_seed(seed)
            model = get_iapt_model(tiny_lm(), IAPTConfig(bottleneck=8, num_soft_tokens=4))
            model.save_pretrained(adapters / name)
            model.unload()
        keys = Path(tmp) / "keys.yaml"
        keys.write_text(
            "sk-alice: {tenant: alice, adapters: [alice]}\nsk-bob: {tenant: bob, adapters: [bob]}\n"
            "sk-admin: {tenant: ops, admin: true}\n"
        )
        engine = Engine(
            tiny_lm(), tiny_tokenizer(), adapters, base_name="tiny", max_batch_size=args.batch, max_queue=args.queue
        )
        app = create_app(engine, KeyRing.from_file(keys), max_tokens_limit=args.max_tokens)
        rss_before = proc_status_kib("VmRSS")
        answers: dict[int, list[tuple[int, float, bool]]] = collections.defaultdict(list)  # i -> (status, s, ok)
        next_id = iter(range(args.requests))
        lock = threading.Lock()
        deadline = time.monotonic() + args.deadline

        with BackgroundServer(app, host=HOST) as server:

            def client(k: int) -> None:
                tenant = ("alice", "bob")[k % 2]
                with httpx.Client(
                    base_url=server.url, timeout=60, headers={"Authorization": f"Bearer sk-{tenant}"}
                ) as http:
                    while time.monotonic() < deadline:
                        with lock:
                            i = next(next_id, None)
                        if i is None:
                            return
                        start = time.perf_counter()
                        r = http.post(
                            "/v1/completions",
                            json={
                                "model": tenant,
                                "prompt": f"request {i}: say something",
                                "max_tokens": args.max_tokens,
                                "temperature": 0,
                                "ignore_eos": True,
                            },
                        )
                        ok = (r.status_code == 200 and len(r.json()["choices"]) == 1) or (
                            r.status_code == 429 and int(r.headers.get("retry-after", "0")) >= 1
                        )
                        with lock:
                            answers[i].append((r.status_code, time.perf_counter() - start, ok))

            started = time.perf_counter()
            workers = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - started
            metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
        rss_after = proc_status_kib("VmRSS")
        finished = engine.requests_finished
        engine.close()

    statuses = collections.Counter(s for a in answers.values() for s, _, _ in a)
    lost = args.requests - len(answers)
    doubled = sum(1 for a in answers.values() if len(a) > 1)
    malformed = sum(1 for a in answers.values() for _, _, ok in a if not ok)
    server_counts = collections.Counter()
    for status, value in re.findall(r'iapt_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)', metrics):
        server_counts[int(status)] += int(float(value))
    latency = [t for a in answers.values() for s, t, _ in a if s == 200]
    rows = [
        ("requests sent", args.requests),
        ("clients / queue / batch", f"{args.clients} / {args.queue} / {args.batch}"),
        ("200", statuses.get(200, 0)),
        ("429 (all with Retry-After)", statuses.get(429, 0)),
        ("other statuses", sum(v for k, v in statuses.items() if k not in (200, 429))),
        ("lost / doubled / malformed", f"{lost} / {doubled} / {malformed}"),
        ("server's count 200 / 429", f"{server_counts.get(200, 0)} / {server_counts.get(429, 0)}"),
        ("engine's finished requests", finished),
        (
            "latency of 200s p50 / p99",
            f"{percentile(latency, 0.5) * 1000:.0f} ms / {percentile(latency, 0.99) * 1000:.0f} ms",
        ),
        ("wall time", f"{wall:.1f} s"),
        ("RSS before / after", f"{(rss_before or 0) / 1024:.0f} MiB / {(rss_after or 0) / 1024:.0f} MiB"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    consistent = (
        lost == 0
        and doubled == 0
        and malformed == 0
        and set(statuses) <= {200, 429}
        and server_counts.get(200, 0) == statuses.get(200, 0) == finished
        and server_counts.get(429, 0) == statuses.get(429, 0)
    )
    print(
        f"\n{'OK' if consistent else 'INCONSISTENT'}: every request answered once, 200 or 429, "
        "and the server's counts agree"
        if consistent
        else "\nINCONSISTENT: see the table"
    )
    sys.exit(0 if consistent else 1)


if __name__ == "__main__":
    main()
