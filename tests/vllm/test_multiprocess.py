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
