"""Incremental detokenization for streaming: text as it becomes final, stop strings honoured across tokens."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Incremental detokenization of one choice, with OpenAI ``stop`` strings.

    Each token decodes only a short window (the offsets scheme of TGI / vLLM), so a long answer costs
    O(length), not O(length^2), on the event loop. Text is held back while it could still be the start
    of a stop string or ends in a partial UTF-8 character, so a stream never shows text the final answer
    will not contain.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # decode window: tokens[prefix:read] are context, the rest is new
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one token; return the text that is now safe to show."""
        self.tokens.append(token)
        context = self._decode(self.tokens[self.prefix : self.read])
        window = self._decode(self.tokens[self.prefix :])
        if len(window) <= len(context) or window.endswith("\ufffd"):
            return ""  # no new complete character yet
        searched = max(0, len(self.text) - self.hold)
        self.text += window[len(context) :]
        self.prefix, self.read = self.read, len(self.tokens)
        cuts = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.finish_reason = self.text[: min(cuts)], "stop"
            return self.flush()
        out = self.text[self.sent : max(self.sent, len(self.text) - self.hold)]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
