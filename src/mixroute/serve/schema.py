"""Request and response bodies of the OpenAI-compatible API (the subset mixroute serves), as pydantic models.

Responses follow the OpenAI schema field for field so the official ``openai`` client parses them unchanged;
``routing`` is mixroute's extension (extra fields are allowed by the OpenAI client).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class MixrouteOptions(BaseModel):
    """The optional ``mixroute`` request object: fixed weights over experts, the category for routers that
    route by label (oracle, poly), or lambda of cost-aware routing (expert libraries)."""

    model_config = ConfigDict(extra="forbid")
    weights: Optional[Union[list[float], dict[str, float]]] = None
    category: Optional[str] = None
    route_cost_weight: Optional[float] = Field(None, ge=0.0, le=1e6)


class AddExpertRequest(BaseModel):
    """``POST /v1/experts``: a PEFT LoRA adapter directory on the server's disk joins the served library."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    adapter_dir: str = Field(min_length=1)
    examples: Optional[list[str]] = Field(None, min_length=1, max_length=10000)
    cost: Optional[float] = Field(None, ge=0.0)
    description: str = ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    mixroute: Optional[MixrouteOptions] = None
    # vLLM's request extensions, so answers of equal length can be compared across engines
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict]]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)
