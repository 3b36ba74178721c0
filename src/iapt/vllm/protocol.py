"""How an IAPT request travels through vLLM: a header of in-vocabulary ids in the slots' place.

IAPTModel feeds ``n`` slots at positions 0..n-1 and the prompt from position n on. Here the slots are the
header tokens themselves, so the positions are exactly IAPTModel's, and the header tells the model which
adapter to run and how many tokens after the slots are the instruction the generators pool::

    [MARKER, adapter index, L // V, L % V, MARKER, ..., MARKER] + prompt        (n header tokens)

(n is the adapter's ``IAPTConfig.num_slots``: its soft tokens, plus one for a sink column, which no generator
writes.)

V is the vocabulary size (every id stays in the vocabulary: vLLM's renderer rejects the others), the
adapter index is 1-based in the order the adapters are given (an adapter loaded at run time takes the first
free index; an unloaded one leaves its index free, slot count 0), L <= len(prompt). The model replaces the
header ids by the slot token id (what IAPTModel feeds there) before embedding them, and writes each
layer's soft tokens over the slots. A base request is its prompt unchanged, which therefore must not
begin with the marker: :meth:`Header.encode` refuses such a prompt.

No vLLM import here: a client that only builds prompts needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_SLOTS = 4  # marker, adapter index and two ids for L


@dataclass(frozen=True)
class Header:
    """The encoding both sides agree on: the marker id, the vocabulary size and each adapter's slot count."""

    marker: int
    vocab_size: int
    num_slots: Sequence[int]  # num_slots[i - 1]: slot count of adapter index i; 0: no adapter at i (unloaded)

    def __post_init__(self) -> None:
        if not 0 <= self.marker < self.vocab_size:
            raise ValueError(f"the IAPT marker id {self.marker} is outside the vocabulary [0, {self.vocab_size})")
        if len(self.num_slots) >= self.vocab_size:
            raise ValueError(
                f"{len(self.num_slots)} adapters do not fit in one id of a {self.vocab_size}-token vocabulary"
            )
        for i, n in enumerate(self.num_slots, start=1):
            if 0 < n < MIN_SLOTS or n < 0:
                raise ValueError(
                    f"adapter index {i} has {n} soft tokens; the vLLM plugin needs at least "
                    f"{MIN_SLOTS} (its header: marker, adapter index, two ids for the instruction "
                    "length)"
                )

    def in_use(self) -> list[int]:
        return [i for i, n in enumerate(self.num_slots, start=1) if n]

    def free_index(self) -> int:
        """The index an adapter loaded now takes: the first free one, else the next."""
        return next((i for i, n in enumerate(self.num_slots, start=1) if n == 0), len(self.num_slots) + 1)

    def with_slots(self, index: int, n: int) -> Header:
        """This header with adapter index ``index`` holding ``n`` slots (0: freed)."""
        slots = list(self.num_slots) + [0] * max(0, index - len(self.num_slots))
        slots[index - 1] = n
        while slots and slots[-1] == 0:
            slots.pop()
        return Header(self.marker, self.vocab_size, slots)

    @property
    def max_instruction(self) -> int:
        return self.vocab_size * self.vocab_size - 1

    def encode(self, prompt: Sequence[int], index: int = 0, instruction_length: int | None = None) -> list[int]:
        """The prompt vLLM is given: ``prompt`` alone for the base (index 0), else header + prompt.

        ``instruction_length``: how many of the prompt's first tokens the generators pool (default: all of
        them, what ``IAPTModel.generate`` pools without an ``instruction_mask``).
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if index == 0:
            if prompt[0] == self.marker:
                raise ValueError(
                    f"this base-model prompt begins with token {self.marker}, the IAPT marker: the "
                    "model would read it as an IAPT header. Start it with another token, or serve "
                    "with another marker (IAPTServing(marker=...))"
                )
            return prompt
        if not 1 <= index <= len(self.num_slots) or self.num_slots[index - 1] == 0:
            raise ValueError(f"no adapter at index {index} (indices in use: {self.in_use() or 'none'})")
        length = len(prompt) if instruction_length is None else int(instruction_length)
        if not 0 <= length <= len(prompt):
            raise ValueError(f"instruction_length {length} is not in [0, {len(prompt)}] (the prompt's length)")
        if length > self.max_instruction:
            raise ValueError(
                f"an instruction of {length} tokens does not fit the header (at most {self.max_instruction})"
            )
        n = self.num_slots[index - 1]
        header = [self.marker, index, length // self.vocab_size, length % self.vocab_size]
        return header + [self.marker] * (n - MIN_SLOTS) + prompt

    def decode(self, tokens: Sequence[int]) -> tuple[int, int, int]:
        """(adapter index, slot count n, instruction length L) of a header at the start of ``tokens``.

        ``tokens`` must hold at least the header. Raises ValueError for a malformed header (never guesses).
        """
        if len(tokens) < MIN_SLOTS or tokens[0] != self.marker:
            raise ValueError(f"not an IAPT header: {list(tokens[:MIN_SLOTS])}")
        index = int(tokens[1])
        if not 1 <= index <= len(self.num_slots):
            raise ValueError(
                f"an IAPT header names adapter index {index}, but {len(self.num_slots)} adapters are "
                "loaded (a base prompt beginning with the marker, or a client with another adapter "
                "list)"
            )
        n = self.num_slots[index - 1]
        if n == 0:
            raise ValueError(f"an IAPT header names adapter index {index}, which is unloaded")
        if len(tokens) < n or any(int(t) != self.marker for t in tokens[MIN_SLOTS:n]):
            raise ValueError(f"an IAPT header for adapter index {index} must be {n} tokens ending in markers")
        length = int(tokens[2]) * self.vocab_size + int(tokens[3])
        return index, n, length
