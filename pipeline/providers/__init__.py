"""Provider adapters: request bytes out, `Completion` or a classified error in."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import errors
from pipeline.providers.anthropic import AnthropicMessages
from pipeline.providers.base import Completion, Provider, SchemaFormatRefused, clip
from pipeline.providers.modelslab import ModelsLabChat
from pipeline.providers.openai import OpenAIChat
from pipeline.requests.prompts import RequestSpec

__all__ = ["Completion", "Provider", "SchemaFormatRefused", "make_provider", "read_reply"]

# Shorter "keys" are placeholders (vLLM's "EMPTY", "x"): masking them would mangle replies
# ("k" is in "prompt_tokens"), and they protect nothing.
MIN_SECRET = 8


def read_reply(provider: Provider, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
    """Parse a reply at the package boundary: only `RequestError`s leave, and never the key.

    A key (or a header value read from the environment) echoed by the server
    is masked in the raw bytes, before any message is cut from them. A reply
    of a shape the adapter did not expect (a string where an object belongs,
    say) is a malformed reply, retried like one, never an exception that
    would end the run.
    """
    for secret in provider.secrets:
        if len(secret) >= MIN_SECRET:
            body = body.replace(secret.encode(), b"***")
    try:
        return provider.parse(status, headers, body)
    except errors.KeyRefused as exc:
        if provider.sends_key:
            raise
        raise errors.KeyRefused(exc.message.rstrip(".") + NO_KEY_SENT, kind=exc.kind) from None
    except errors.RequestError:
        raise
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise errors.MalformedReply(
            f"reply of an unexpected shape ({type(exc).__name__}: {clip(exc, 160)})", kind="malformed_reply"
        ) from None


# The usual cause of a 401 from a user's own server: OPENAI_API_KEY is set, but it goes only to
# OpenAI's own URL (config.RunConfig.key_env), so the server got no key at all.
NO_KEY_SENT = (
    ". No API key was sent with the request: a key in OPENAI_API_KEY goes only to api.openai.com. "
    "Pass --api-key-env OPENAI_API_KEY (or the variable holding this server's key), "
    "or a header such as --header 'Authorization: Bearer $MY_KEY'"
)


def make_provider(
    name: str,
    base_url: str,
    spec: RequestSpec,
    api_key: str | None,
    headers: Mapping[str, str] | None = None,
    secrets: tuple[str, ...] = (),
) -> Provider:
    """The adapter for `name`; `headers` are sent with every request (over the adapter's own of
    the same name), `secrets` are values to mask in replies besides the key."""
    if name == "modelslab":
        return ModelsLabChat(base_url, spec, api_key, headers, secrets)
    if name == "anthropic":
        return AnthropicMessages(base_url, spec, api_key, headers, secrets)
    return OpenAIChat(base_url, spec, api_key, headers, secrets)  # openai and local speak the same format
