"""vLLM's default layout: the engine core in its own process, where the plugin arrives by its entry point."""

from __future__ import annotations

from iapt.vllm import IAPTServing
from tests.vllm.test_plugin import MAX_TOKENS, folders, prompts, reference  # noqa: F401  (folders: a fixture)


def test_engine_core_process_serves_like_offline_generate(folders, monkeypatch):  # noqa: F811
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    base_dir, adapter_dirs = folders
    serving = IAPTServing(base_dir, adapter_dirs)
    llm = LLM(
        **serving.engine_args(
            dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=512, seed=0
        )
    )
    try:
        names = ["alice", None, "bob", "carol"]
        batch = prompts(len(names), seed=9)
        outs = llm.generate(
            [serving.prompt(p, a) for p, a in zip(batch, names, strict=True)],
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [
        reference(base_dir, adapter_dirs.get(a) if a else None, p) for p, a in zip(batch, names, strict=True)
    ]


def test_run_time_loads_reach_the_engine_core_process(folders, monkeypatch, tmp_path):  # noqa: F811
    """VLLMEngine with the engine core in its own process: an IAPT adapter loaded at run time (collective_rpc to
    the worker there) and a LoRA one (add_lora; LoRA enabled at start without a LoRA tenant) answer as offline."""
    from iapt.serving.requests import Request
    from iapt.vllm.engine import VLLMEngine
    from tests.vllm.test_lora import peft_reference, save_lora
    from tests.vllm.test_plugin import tiny_base

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    base_dir, adapter_dirs = folders
    lora = save_lora(tiny_base(), tmp_path / "lo", seed=31)
    engine = VLLMEngine(
        base_dir,
        adapters={"alice": adapter_dirs["alice"]},
        max_batch_size=4,
        max_model_len=128,
        engine_kwargs={"enforce_eager": True, "max_num_batched_tokens": 512, "seed": 0, "enable_lora": True},
    )
    engine.start()
    try:
        engine.load_adapter("bob", adapter_dirs["bob"])
        engine.load_adapter("lo", lora)
        batch = prompts(3, seed=4)
        handles = engine.submit_many(
            [Request(p, a, max_tokens=MAX_TOKENS) for p, a in zip(batch, ["bob", "lo", "alice"])]
        )
        got = [h.wait(120).tokens for h in handles]
        engine.unload_adapter("bob")
        assert not engine.has_model("bob")
    finally:
        engine.close()
    assert got == [
        reference(base_dir, adapter_dirs["bob"], batch[0]),
        peft_reference(base_dir, lora, batch[1])[0],
        reference(base_dir, adapter_dirs["alice"], batch[2]),
    ]
