"""Request bodies of the worker's API (pydantic): what each endpoint accepts, with OpenAI's names and limits.

OpenAI parameters this engine does not implement are refused with a 400 naming them (`unsupported`), never
accepted and ignored: a client relying on `tools` or `response_format` learns at once that it cannot here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from residency_worker.engine.generate import SEED_MAX, SEED_MIN

STOP_MAX_COUNT = 4
STOP_MAX_CHARS = 256
"""Limits on `stop` (OpenAI's count): each is matched against the text's tail at every token, so a long
one costs every sequence of the batch."""
MAX_CHOICES = 16
"""`n` at most: each choice is one more sequence in the model's batch."""
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (5 for completions)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _OpenAIBody(BaseModel):
    """Keeps unknown fields (`model_extra`) so that unsupported OpenAI parameters can be refused by name."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


_NEUTRAL: dict[str, Any] = {
    # parameter → the values that ask for nothing (accepted); any other value is refused
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "suffix": (None, ""),
    "echo": (None, False),
    "best_of": (None, 1),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "reasoning_effort", "safety_identifier"})
"""Parameters that change nothing about the answer (bookkeeping on OpenAI's side): accepted."""


def unsupported(body: BaseModel) -> str | None:
    """The first parameter of `body` that asks for something this worker does not do, or None."""
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED:
            continue
        if name not in _NEUTRAL:
            return name
        if value not in _NEUTRAL[name]:
            return name
    return None


class CompletionBody(_OpenAIBody):
    model: str
    prompt: str | list[int] | list[str]
    max_tokens: int = Field(default=16, ge=1, le=1_048_576)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Top alternatives per token (0-5).")


class ContentPart(_Body):
    """One part of a message's content, as OpenAI's SDKs send it: text is all a text model takes."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    # `developer` is what newer OpenAI SDKs send for `system`.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The content as one string (parts joined; none, as an assistant's tool-call turn has, is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def chat_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatBody(_OpenAIBody):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_048_576)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class GpuShareBody(_Body):
    """One GPU of a split: its index on the node and its share of the weight bytes."""

    index: int = Field(ge=0, lt=64)
    resident_fraction: float = Field(ge=0.0, le=1.0)


class LoadBody(_Body):
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    path: str = Field(min_length=1, max_length=4096)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    resident_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    decode_mode: Literal["stream", "cpu", "auto"] = "auto"
    prefill_mode: Literal["stream", "cpu", "auto"] | None = None
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    max_sequence_length: int = Field(default=2048, ge=2, le=1_048_576)
    max_queue: int = Field(default=64, ge=1, le=100_000)
    min_decode_tokens_per_second: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="The decode SLO: the model is paced to it while a model beside it has requests waiting.",
    )
    gpus: list[GpuShareBody] = Field(
        default_factory=list,
        max_length=64,
        description="GPUs in pipeline order with their shares (sum = resident_fraction); empty: GPU 0.",
    )


class ResidencyBody(_Body):
    resident_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    decode_mode: Literal["stream", "cpu"] | None = None
    prefill_mode: Literal["stream", "cpu"] | None = None
    gpus: list[GpuShareBody] | None = Field(
        default=None, max_length=64, description="Move to these GPUs and shares; none: keep its GPUs."
    )


class BudgetBody(_Body):
    gpu_memory_bytes: int = Field(ge=1)
    gpu: int | None = Field(default=None, ge=0, lt=64, description="The GPU whose budget; none: every GPU.")


class ProfileBody(_Body):
    path: str = Field(min_length=1, max_length=4096)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    fractions: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default=[1.0, 0.9, 0.75, 0.5, 0.25, 0.0], min_length=1, max_length=32
    )
    # bounded: the profile builds each prompt as a Python list of this many token ids
    sequence_lengths: list[Annotated[int, Field(ge=1, le=1_048_576)]] = Field(
        default=[128, 512], min_length=1, max_length=8
    )
    decode_tokens: int = Field(default=16, ge=1, le=4096)
    trials: int = Field(default=3, ge=1, le=100)
