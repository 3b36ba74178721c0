"""The plugin under vLLM's engine features that touch the slots: torch.compile, salted prefix caching, and
preemption with recompute. One compiled engine with prefix caching on and too few KV blocks for its batch."""

from __future__ import annotations

import pytest
import torch

from iapt.vllm import IAPTServing
from tests.vllm.test_plugin import MAX_TOKENS, VOCAB, folders, reference  # noqa: F401  (folders: a fixture)


@pytest.fixture(scope="module")
def engine(folders):  # noqa: F811
    """(serving, llm, counters): counters["preempted"] and counters["cached"] (prompt tokens read from cache)."""
    from vllm import LLM
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    base, adapters = folders
    serving = IAPTServing(base, adapters)
    counters = {"preempted": 0, "cached": 0}
    preempt, computed = Scheduler._preempt_request, KVCacheManager.get_computed_blocks

    def counting_preempt(self, request, *args, **kwargs):
        counters["preempted"] += 1
        return preempt(self, request, *args, **kwargs)

    def counting_computed(self, request):
        out = computed(self, request)
        counters["cached"] += out[1]
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Scheduler, "_preempt_request", counting_preempt)
        patch.setattr(KVCacheManager, "get_computed_blocks", counting_computed)
        llm = LLM(
            **serving.engine_args(
                dtype="float32",
                enforce_eager=False,
                enable_prefix_caching=True,
                salted_prefix_caching=True,
                block_size=32,
                num_gpu_blocks_override=5,
                max_model_len=128,
                max_num_seqs=4,
                max_num_batched_tokens=256,
                seed=0,
            )
        )
        yield serving, llm, counters
        del llm


def test_compiled_prefix_cached_and_preempted_requests_equal_offline_generate(engine, folders):  # noqa: F811
    """Prompts of 58 tokens sharing their first 40 (a block holding the slots and 28 shared tokens): with
    2 + 1 blocks per request and 5 blocks in all, requests are preempted and recomputed; the salt keeps an
    instruction's cached slots from serving another instruction, and a repeated request reads them."""
    from vllm import SamplingParams

    serving, llm, counters = engine
    base_dir, adapter_dirs = folders
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(4, VOCAB, (40,), generator=g).tolist()
    tails = [torch.randint(4, VOCAB, (18,), generator=g).tolist() for _ in range(3)]
    first = [
        (shared + tails[0], "alice"),
        (shared + tails[1], "alice"),
        (shared + tails[0], "carol"),
        (shared + tails[0], None),
    ]
    second = [(shared + tails[0], "alice"), (shared + tails[2], "alice")]  # a repeat (cache hit) and a new one
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    got, want = [], []
    for round_ in (first, second):
        outs = llm.generate([serving.prompt(p, a) for p, a in round_], params, use_tqdm=False)
        got += [list(o.outputs[0].token_ids) for o in outs]
        want += [reference(base_dir, adapter_dirs.get(a) if a else None, p) for p, a in round_]
    assert got == want
    assert got[0] != got[1], "the two instructions sharing a cached block's tokens must differ"
    assert counters["preempted"] > 0, "the batch was meant to run out of KV blocks"
    assert counters["cached"] > 0, "the repeated request was meant to read its cached prefix"
