"""The one record type every data source produces, and the error every data problem raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
"""One chat turn: ``{"role": "user" | "assistant" | "system" | ..., "content": str}``."""


class DataError(ValueError):
    """A data file, row or task that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One instruction/response pair.

    ``prompt`` is either plain instruction text or the chat turns that precede the answer
    (roles kept, so a chat template can render them). ``response`` is the training target.
    ``references`` holds every gold answer a metric may accept (defaults to ``(response,)``);
    ``label`` is the class word for classification tasks; ``meta`` carries source ids
    (article title, MR, ...) so that splits and errors can be traced back to the data.
    """

    prompt: str | list[Message]
    response: str
    references: tuple[str, ...] = ()
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Accept any sequence for references; store an immutable tuple that is never empty.
        refs = tuple(self.references) if self.references else (self.response,)
        object.__setattr__(self, "references", refs)
