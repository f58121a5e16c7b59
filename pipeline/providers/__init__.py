"""Provider adapters: request bytes out, `Completion` or a classified error in."""

from __future__ import annotations

from pipeline.prompts import RequestSpec
from pipeline.providers.anthropic import AnthropicMessages
from pipeline.providers.base import Completion, Provider
from pipeline.providers.modelslab import ModelsLabChat
from pipeline.providers.openai import OpenAIChat

__all__ = ["Completion", "Provider", "make_provider"]


def make_provider(name: str, base_url: str, spec: RequestSpec, api_key: str | None) -> Provider:
    if name == "modelslab":
        return ModelsLabChat(base_url, spec, api_key)
    if name == "anthropic":
        return AnthropicMessages(base_url, spec, api_key)
    return OpenAIChat(base_url, spec, api_key)  # openai and local speak the same format
