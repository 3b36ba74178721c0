"""The HTTP API's protocol: request bodies, responses and errors, in OpenAI's shapes (vLLM's for its extras).

Apart from the handlers (``app.py``), as vLLM keeps each endpoint's ``protocol`` beside its ``serving``: what a
client may send and what it gets back, validated by pydantic before anything reaches the engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from iapt.serving.engine import (
    FREQUENCY_PENALTY_RANGE,
    MAX_LOGPROBS,
    PRESENCE_PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
)

_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


# ------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        code: str | int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers, param
        self.code = status if code is None else code

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        # ASCII JSON: a message quoting the client's text (a model name, say) may hold a lone surrogate
        return Response(json.dumps(body), status_code=self.status, headers=self.headers, media_type="application/json")


def _model_not_found(model: str) -> APIError:
    """OpenAI's answer for a model that does not exist *or* is not the caller's: the two are not told apart,
    so a tenant cannot find out which adapters other tenants have."""
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """Every error the server sends (4xx and 5xx), in OpenAI's shape."""

    error: ErrorDetail


# ------------------------------------------------------------------------------------------ bodies
def _lone_surrogate(value: Any, where: str = "body") -> str | None:
    """Where a string holds a lone surrogate (JSON allows "\\ud800", UTF-8 and the tokenizer do not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where}: the text has a lone surrogate (invalid Unicode) at position {exc.start}"
    elif isinstance(value, dict):
        for k, v in value.items():
            if (found := _lone_surrogate(k, where) or _lone_surrogate(v, f"{where}.{k}")) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _lone_surrogate(v, f"{where}.{i}")) is not None:
                return found
    return None


class _Strict(BaseModel):
    """Bodies: finite numbers only, and no lone surrogates anywhere (both reached the model as a 500).

    A field the server does not know is a 400 naming it (``tools``, ``response_format``, ``logit_bias``, a
    typo): ignoring it would answer something the caller did not ask for. One sent as null is dropped, as
    null is "not used" (some clients send every field).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (problem := _lone_surrogate(data)) is not None:
            raise ValueError(problem)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64; seed + choice index stays within what torch takes


class StreamOptions(_Strict):
    include_usage: bool = False


class _Body(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="below 0.01: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM's: sample among the k most likely tokens; 0 or -1: off")
    repetition_penalty: float | None = Field(
        None,
        ge=REPETITION_PENALTY_RANGE[0],
        le=REPETITION_PENALTY_RANGE[1],
        description="vLLM's / transformers': logits of prompt and output tokens divided (> 1: less repetition)",
    )
    frequency_penalty: float | None = Field(None, ge=FREQUENCY_PENALTY_RANGE[0], le=FREQUENCY_PENALTY_RANGE[1])
    presence_penalty: float | None = Field(None, ge=PRESENCE_PENALTY_RANGE[0], le=PRESENCE_PENALTY_RANGE[1])
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False  # vLLM's extension; handy for benchmarks
    user: str | None = Field(None, description="the caller's end-user id (OpenAI's); not used")

    def top_logprob_count(self) -> int | None:
        """How many top logprobs per token the request wants; None: no logprobs."""
        raise NotImplementedError


class CompletionBody(_Body):
    prompt: (
        Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    )
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="each token's logprob and the k most likely tokens' (k = this)"
    )

    def top_logprob_count(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    """A content part; text only (a model without a vision tower has nothing to read an image with)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # passed to the chat template


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")

    def top_logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterBody(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(_Strict):
    lora_name: str = Field(min_length=1)


class TokenizeCompletionBody(_Strict):
    """vLLM's ``/tokenize`` of a prompt."""

    model: str | None = Field(None, description="a model this key may use; default: the base model's tokenizer")
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatBody(_Strict):
    """vLLM's ``/tokenize`` of chat messages: the prompt the chat endpoint would feed the model."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


TokenizeBody = Annotated[
    Annotated[TokenizeCompletionBody, Tag("tokenize_prompt")] | Annotated[TokenizeChatBody, Tag("tokenize_chat")],
    Discriminator(
        lambda v: (
            "tokenize_chat"
            if isinstance(v, dict) and "messages" in v or isinstance(v, TokenizeChatBody)
            else "tokenize_prompt"
        )
    ),
]
_TAGS = ("tokenize_prompt", "tokenize_chat")


def _union_label(part: Any) -> bool:
    """Whether a validation error's location part names a union member (``str``, ``list[TextPart]``, a tag),
    not a field: left out of the field path in error messages."""
    return isinstance(part, str) and (part in _TAGS or "[" in part or part in ("str", "int", "float", "bool"))


class DetokenizeBody(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ------------------------------------------------------------------------------------------ responses
class Health(BaseModel):
    status: str


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class AdapterStatus(BaseModel):
    status: str
    name: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "invalid request (the message says which field and why)",
        401: "missing or invalid API key",
        403: "needs an admin key",
        404: "no such model, or not this key's",
        409: "the adapter has requests queued or running (--engine vllm); retry once they have finished",
        413: "request body over the server's limit",
        429: "the queue is full; retry after Retry-After",
        500: "the engine failed on this request alone (others are unaffected)",
    }
    out: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


_GENERATE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the completion; with stream=true, server-sent events",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["id", "object", "choices"]}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
    **_errors(400, 401, 404, 413, 429, 500),
}
