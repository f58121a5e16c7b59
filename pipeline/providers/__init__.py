"""Provider adapters: request bytes out, `Completion` or a classified error in."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import errors
from pipeline.prompts import RequestSpec
from pipeline.providers.anthropic import AnthropicMessages
from pipeline.providers.base import Completion, Provider, clip
from pipeline.providers.modelslab import ModelsLabChat
from pipeline.providers.openai import OpenAIChat

__all__ = ["Completion", "Provider", "make_provider", "read_reply"]

# Shorter "keys" are placeholders (vLLM's "EMPTY", "x"): masking them would mangle replies
# ("k" is in "prompt_tokens"), and they protect nothing.
MIN_SECRET = 8


def read_reply(provider: Provider, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
    """Parse a reply at the package boundary: only `RequestError`s leave, and never the key.

    A key echoed by the server is masked in the raw bytes, before any message
    is cut from them. A reply of a shape the adapter did not expect (a
    string where an object belongs, say) is a malformed reply, retried like
    one, never an exception that would end the run.
    """
    if provider.secret and len(provider.secret) >= MIN_SECRET:
        body = body.replace(provider.secret.encode(), b"***")
    try:
        return provider.parse(status, headers, body)
    except errors.RequestError:
        raise
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise errors.MalformedReply(
            f"reply of an unexpected shape ({type(exc).__name__}: {clip(exc, 160)})", kind="malformed_reply"
        ) from None


def make_provider(name: str, base_url: str, spec: RequestSpec, api_key: str | None) -> Provider:
    if name == "modelslab":
        return ModelsLabChat(base_url, spec, api_key)
    if name == "anthropic":
        return AnthropicMessages(base_url, spec, api_key)
    return OpenAIChat(base_url, spec, api_key)  # openai and local speak the same format
