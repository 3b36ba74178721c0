"""IAPT adapters served by vLLM (iapt.vllm) give exactly IAPTModel.generate's greedy tokens; what is refused.

A tiny Llama built in code (head size 32: the smallest vLLM's CPU attention takes), saved with a tokenizer,
and three adapters with random up-projections: anchored (the default start), a zero start, and one with 6
slots after a sink column, mean pooling and a generator on one layer only. One vLLM engine for the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from iapt.serving.engine import UnknownAdapter
from iapt.vllm import IAPTServing, check_vllm_config
from tests.tiny import _COMMON, tiny_tokenizer

VOCAB = 100  # tiny_tokenizer's
ADAPTERS = {
    "alice": {"bottleneck": 8},  # 4 slots, attention pooling, anchored on the pad token (the defaults)
    # 6 soft tokens after a sink column (IAPTConfig.sink_token), mean pooling, one layer, output in anchor units
    "bob": {
        "bottleneck": 4,
        "num_soft_tokens": 6,
        "pooling": "mean",
        "layers": [1],
        "output_scale": "anchor",
        "sink_token": True,
    },
    "carol": {"bottleneck": 8, "anchor": "none"},  # the paper's zero start
}
MAX_TOKENS = 8


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            **_COMMON,
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # sharp logits: greedy is stable against float noise
        model.get_input_embeddings().weight[0].normal_(std=4.0)  # the pad (slot) id gets a state: anchors show,
        # of an RMS far from 1 (the output_scale of "bob" then matters)
    return model


def save_adapter(base: torch.nn.Module, path: Path, seed: int, **cfg: object) -> Path:
    torch.manual_seed(seed)
    model = get_iapt_model(base, IAPTConfig(**cfg))
    with torch.no_grad():
        for generator in model.generators.values():
            torch.nn.init.normal_(generator.up.weight, std=1.0)
            torch.nn.init.normal_(generator.up.bias, std=0.5)
    model.save_pretrained(path)
    model.unload()
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("vllm")
    base = tiny_base()
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    adapters = {
        name: save_adapter(base, root / "adapters" / name, seed, **cfg)
        for seed, (name, cfg) in enumerate(ADAPTERS.items(), start=1)
    }
    return root / "base", adapters


@pytest.fixture(scope="module")
def serving(folders: tuple[Path, dict[str, Path]]) -> IAPTServing:
    base, adapters = folders
    return IAPTServing(base, adapters)


@pytest.fixture(scope="module")
def llm(serving: IAPTServing):
    from vllm import LLM

    engine = LLM(
        **serving.engine_args(
            dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=512, seed=0
        )
    )
    yield engine
    del engine


def reference(base_dir: Path, adapter_dir: Path | None, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy IAPTModel.generate (or the bare base) of one request alone."""
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = {"max_new_tokens": max_tokens, "do_sample": False, "pad_token_id": 0}
    if adapter_dir is None:
        out = base.generate(ids, **kwargs)
    else:
        out = IAPTModel.from_pretrained(base, adapter_dir).generate(ids, **kwargs)
    return out[0, len(prompt) :].tolist()


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, VOCAB, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
        for _ in range(count)
    ]


def test_mixed_batch_equals_offline_generate(llm, serving, folders):
    """Base and three adapters' requests in one batch: each gets IAPTModel.generate's tokens alone."""
    from vllm import SamplingParams

    base_dir, adapter_dirs = folders
    names = [None, "alice", "bob", "carol", "alice", None, "bob", "carol"]
    batch = prompts(len(names), seed=1)
    outs = llm.generate(
        [serving.prompt(p, a) for p, a in zip(batch, names, strict=True)],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        use_tqdm=False,
    )
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = [reference(base_dir, adapter_dirs.get(a) if a else None, p) for p, a in zip(batch, names, strict=True)]
    assert got == want
    # The adapters matter: each differs from the bare base on its prompt (else equality would prove nothing).
    bare = [reference(base_dir, None, p) for p in batch]
    assert all(g != b for g, b, a in zip(got, bare, names, strict=True) if a)


def test_a_shorter_instruction_pools_only_that_prefix(llm, serving, folders):
    """instruction_length=k: the generators pool the first k prompt tokens (IAPTModel's instruction_mask)."""
    from vllm import SamplingParams

    base_dir, adapter_dirs = folders
    prompt = prompts(1, seed=7)[0] + [5, 6, 7]
    k = len(prompt) - 3
    out = llm.generate(
        [serving.prompt(prompt, "alice", instruction_length=k)],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        use_tqdm=False,
    )
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = IAPTModel.from_pretrained(base, adapter_dirs["alice"])
    ids = torch.tensor([prompt])
    mask = torch.zeros_like(ids)
    mask[:, :k] = 1
    want = model.generate(ids, instruction_mask=mask, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    assert list(out[0].outputs[0].token_ids) == want


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"enable_chunked_prefill": True}, "enable_chunked_prefill=False"),
        ({"enable_prefix_caching": True}, "enable_prefix_caching=False, or salted_prefix_caching=True"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size=1"),
    ],
)
def test_engine_args_refuse_what_would_be_wrong(serving, kwargs, message):
    with pytest.raises(ValueError, match=message):
        serving.engine_args(**kwargs)


def test_salted_prefix_caching_is_accepted_and_recorded(serving):
    args = serving.engine_args(enable_prefix_caching=True, salted_prefix_caching=True)
    assert args["enable_prefix_caching"] and args["additional_config"]["iapt"]["salted_prefix_caching"]
    assert "cache_salt" in serving.prompt([5, 6], "alice") and "cache_salt" not in serving.prompt([5, 6])
    # the salt covers the instruction: same first tokens, another instruction -> another salt
    assert serving.prompt([5, 6, 7], "alice")["cache_salt"] != serving.prompt([5, 6, 8], "alice")["cache_salt"]


def test_the_resolved_config_is_checked_too(serving):
    """An engine started without engine_args (vLLM's defaults turn chunked prefill and prefix caching on)."""
    from vllm.engine.arg_utils import EngineArgs

    args = serving.engine_args(dtype="float32", max_model_len=128)
    del args["enable_chunked_prefill"], args["enable_prefix_caching"]  # vLLM's defaults
    config = EngineArgs(**args).create_engine_config()
    with pytest.raises(ValueError, match="enable_chunked_prefill=False|enable_prefix_caching=False"):
        check_vllm_config(config)
    check_vllm_config(EngineArgs(**serving.engine_args(dtype="float32", max_model_len=128)).create_engine_config())


def test_a_base_prompt_that_looks_like_a_header_is_refused(serving):
    with pytest.raises(ValueError, match="IAPT marker"):
        serving.prompt([serving.marker, 7, 8])
    assert serving.prompt([7, serving.marker])["prompt_token_ids"] == [7, serving.marker]


def test_an_unknown_adapter_is_refused(serving):
    with pytest.raises(UnknownAdapter, match="no adapter named 'mallory'"):
        serving.prompt([5, 6], "mallory")


def test_a_split_instruction_raises_never_pools_part(serving, folders, monkeypatch):
    """The planner raises on a step holding only part of an IAPT request's instruction (chunked prefill)."""
    from types import SimpleNamespace

    import iapt.vllm.model as plugin

    adapters = plugin.IAPTAdapters.__new__(plugin.IAPTAdapters)
    adapters.header, adapters.slot_token_id = serving.header, 0
    sink = [0] + [int(serving.configs[name].sink_token) for name in sorted(serving.index, key=serving.index.get)]
    # the planner reads each adapter's bank row, and whether it keeps a sink column
    adapters.bank = SimpleNamespace(index=dict(serving.index), sink=torch.tensor(sink))
    adapters.names = {i: name for name, i in serving.index.items()}
    ids = serving.prompt(list(range(10, 30)), "alice")["prompt_token_ids"]  # 4 slots + 20 instruction tokens
    whole, part = torch.tensor(ids), torch.tensor(ids[:12])

    def step(tokens: torch.Tensor):
        meta = SimpleNamespace(query_start_loc=torch.tensor([0, len(tokens)]))
        monkeypatch.setattr(plugin, "is_forward_context_available", lambda: True)
        monkeypatch.setattr(plugin, "get_forward_context", lambda: SimpleNamespace(attn_metadata={"l0": meta}))
        return adapters.plan(tokens, torch.arange(len(tokens)))

    plan, replaced = step(whole)
    slots = plan.plan
    assert slots.columns[0][slots.valid[0]].tolist() == [0, 1, 2, 3] and int(slots.pooled.sum()) == 20
    assert slots.rows[0][slots.pooled[0]].tolist() == list(range(4, 24))  # the instruction's token indices
    assert plan.index.tolist() == [serving.index["alice"]]
    assert replaced[:4].tolist() == [0, 0, 0, 0] and replaced[4:].tolist() == ids[4:]
    sinked = serving.prompt(list(range(10, 30)), "bob")["prompt_token_ids"]  # sink + 6 slots + 20 tokens
    plan, replaced = step(torch.tensor(sinked))
    slots = plan.plan
    assert slots.columns[0][slots.valid[0]].tolist() == [1, 2, 3, 4, 5, 6], "the generators skip the sink column"
    assert slots.rows[0][slots.pooled[0]].tolist() == list(range(7, 27))
    assert replaced[:7].tolist() == [0] * 7 and replaced[7:].tolist() == sinked[7:]
    with pytest.raises(RuntimeError, match="prefill was split"):
        step(part)
    with pytest.raises(ValueError, match="adapter index 9"):  # a raw prompt beginning with the marker
        step(torch.tensor([serving.marker, 9, 0, 3, 5, 6, 7]))
