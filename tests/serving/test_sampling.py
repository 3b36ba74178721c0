"""The engine's sampling parameters: top_k, repetition / frequency / presence penalties and logprobs, per row."""

from __future__ import annotations

import pytest
import torch

from iapt import IAPTModel
from iapt.serving import Engine, Request
from tests.tiny import tiny_lm

torch.set_num_threads(1)
PROMPT = [40, 41, 42, 43, 44]  # no tenant answers it with EOS at once


@pytest.fixture(scope="module")
def engine(adapters_dir, tokenizer):
    eng = Engine(tiny_lm().eval(), tokenizer, adapters_dir, base_name="tiny", max_batch_size=8, max_queue=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def offline():
    """A private copy of the backbone for references."""
    return tiny_lm().eval()


def run(engine: Engine, *requests: Request) -> list[list[int]]:
    handles = engine.generate_many(list(requests))
    assert all(h.finish_reason in ("length", "stop") for h in handles), [h.error for h in handles]
    return [h.tokens for h in handles]


def penalized_greedy(
    model, prompt: list[int], max_tokens: int, frequency: float = 0.0, presence: float = 0.0, repetition: float = 1.0
) -> list[int]:
    """Greedy decoding written out, one full forward per token: the penalties as OpenAI and vLLM define them."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for t in set(ids):  # repetition: prompt and output tokens
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t in set(out):  # frequency and presence: output tokens only
                logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


def test_neutral_values_leave_greedy_and_seeded_output_unchanged(engine, reference, adapters_dir):
    for adapter in (None, "alice", "bob"):
        path = None if adapter is None else adapters_dir / adapter
        neutral = Request(
            PROMPT, adapter, max_tokens=12, top_k=0, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0
        )
        off = Request(PROMPT, adapter, max_tokens=12, top_k=-1, logprobs=0)
        assert run(engine, neutral, off) == [reference(path, PROMPT, 12)] * 2
    sampled = dict(max_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7)
    plain = run(engine, Request(PROMPT, "carol", **sampled))[0]
    assert (
        run(
            engine,
            Request(PROMPT, "carol", top_k=0, **sampled),
            Request(PROMPT, "carol", top_k=-1, **sampled),
            Request(PROMPT, "carol", top_k=10_000, **sampled),
        )
        == [plain] * 3
    )


def test_repetition_penalty_equals_transformers_generate(engine, offline):
    """HF's RepetitionPenaltyLogitsProcessor over prompt + output, as vLLM applies it."""
    plain = run(engine, Request(PROMPT, max_tokens=20, ignore_eos=True))[0]
    for penalty in (1.5, 3.0, 0.5):
        out = run(engine, Request(PROMPT, max_tokens=20, ignore_eos=True, repetition_penalty=penalty))[0]
        hf = offline.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=20,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(PROMPT) :].tolist()
        assert out == hf, penalty
        if penalty > 1:
            assert repeats(out) < repeats(plain) and not set(out[:3]) & set(PROMPT)
    assert repeats(run(engine, Request(PROMPT, max_tokens=20, ignore_eos=True, repetition_penalty=0.5))[0]) > repeats(
        plain
    )  # below 1 rewards repetition


def test_frequency_and_presence_penalties(engine, offline):
    plain = run(engine, Request(PROMPT, max_tokens=20, ignore_eos=True))[0]
    assert repeats(plain) > 0, "the tiny model repeats itself: something to penalize"
    for frequency, presence in ((1.0, 0.0), (0.0, 2.0), (0.5, 0.5), (-1.0, 0.0), (0.0, -2.0)):
        out = run(
            engine,
            Request(PROMPT, max_tokens=20, ignore_eos=True, frequency_penalty=frequency, presence_penalty=presence),
        )[0]
        assert out == penalized_greedy(offline, PROMPT, 20, frequency, presence), (frequency, presence)
        if frequency + presence > 0:
            assert repeats(out) < repeats(plain)
        else:  # negative: repetition rewarded
            assert repeats(out) > repeats(plain)
    # Output tokens only: the prompt's tokens are not penalized (unlike the repetition penalty).
    first = run(
        engine,
        Request(plain[:1] * 3, max_tokens=1, presence_penalty=2.0, frequency_penalty=2.0),
        Request(plain[:1] * 3, max_tokens=1),
    )
    assert first[0] == first[1]


def test_top_k_1_sampling_is_greedy(engine, reference, adapters_dir):
    for adapter, seed in ((None, 1), ("alice", 2), ("carol", 3)):
        path = None if adapter is None else adapters_dir / adapter
        out = run(engine, Request(PROMPT, adapter, max_tokens=12, temperature=1.5, top_k=1, seed=seed))[0]
        assert out == reference(path, PROMPT, 12)
    # top_k narrows sampling: every sampled token is among the k most likely at its step.
    h = engine.generate_many(
        [Request(PROMPT, max_tokens=12, ignore_eos=True, temperature=2.0, top_k=3, seed=4, logprobs=3)]
    )[0]
    assert all(lp.token in [t for t, _ in lp.top] for lp in h.logprobs)


def test_rows_of_one_batch_each_get_their_own_parameters(engine, reference, adapters_dir, offline):
    requests = [
        Request(PROMPT, "alice", max_tokens=10),  # stops at EOS, as generate does
        Request(PROMPT, None, max_tokens=10, ignore_eos=True, repetition_penalty=3.0),
        Request(PROMPT, "carol", max_tokens=10, temperature=1.0, top_k=1, seed=5),
        Request(PROMPT, None, max_tokens=10, ignore_eos=True, presence_penalty=2.0, logprobs=2),
        Request(
            PROMPT,
            "bob",
            max_tokens=10,
            ignore_eos=True,
            temperature=1.0,
            top_k=5,
            top_p=0.9,
            seed=6,
            frequency_penalty=1.0,
        ),
        Request(PROMPT, None, max_tokens=10, ignore_eos=True, frequency_penalty=-1.0),
    ]
    together = run(engine, *requests)
    alone = [run(engine, r)[0] for r in requests]
    assert together == alone
    assert together[0] == reference(adapters_dir / "alice", PROMPT, 10)
    assert together[2] == reference(adapters_dir / "carol", PROMPT, 10)
    assert together[1] == penalized_greedy(offline, PROMPT, 10, repetition=3.0)
    assert together[3] == penalized_greedy(offline, PROMPT, 10, presence=2.0)
    assert together[5] == penalized_greedy(offline, PROMPT, 10, frequency=-1.0)
    assert len({tuple(t) for t in together}) >= 4


def offline_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the offline model's logits at each generated position ``(len(tokens), V)``."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=len(tokens),
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences[0, len(prompt) :].tolist() == tokens
    return torch.log_softmax(torch.stack(out.logits)[:, 0].float(), -1)


@pytest.mark.parametrize("adapter", [None, "alice"])
def test_logprobs_equal_log_softmax_of_the_offline_logits(engine, offline, adapters_dir, adapter):
    h = engine.generate_many(
        [
            Request(PROMPT, adapter, max_tokens=8, ignore_eos=True, logprobs=3),
            Request(PROMPT, "bob", max_tokens=8, ignore_eos=True),
        ]
    )  # a neighbour without
    assert h[1].logprobs == []
    mine = h[0]
    model = offline if adapter is None else IAPTModel.from_pretrained(offline, adapters_dir / adapter)
    try:
        expected = offline_logprobs(model, PROMPT, mine.tokens)
    finally:
        if adapter is not None:
            model.unload()
    assert [lp.token for lp in mine.logprobs] == mine.tokens
    for step, lp in enumerate(mine.logprobs):
        assert lp.logprob == pytest.approx(float(expected[step, lp.token]), abs=1e-4)
        best = expected[step].topk(3)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # Raw logprobs: the model's distribution, whatever penalties and temperature chose the token.
    sampled = engine.generate_many(
        [Request(PROMPT, max_tokens=6, ignore_eos=True, temperature=1.3, seed=9, repetition_penalty=2.0, logprobs=0)]
    )[0]
    ids = torch.tensor([PROMPT + sampled.tokens])
    with torch.no_grad():
        raw = torch.log_softmax(offline(ids).logits[0, len(PROMPT) - 1 : -1].float(), -1)
    assert [lp.logprob for lp in sampled.logprobs] == pytest.approx(
        raw.gather(1, torch.tensor(sampled.tokens)[:, None])[:, 0].tolist(), abs=1e-4
    )
    assert all(lp.top == [] for lp in sampled.logprobs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -2),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 11.0),
        ("repetition_penalty", float("nan")),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("presence_penalty", float("inf")),
        ("logprobs", 21),
        ("logprobs", -1),
    ],
)
def test_out_of_range_values_are_refused(engine, field, value):
    with pytest.raises(ValueError, match=field):
        engine.submit(Request(PROMPT, **{field: value}))
