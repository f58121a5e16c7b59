"""What each provider takes in images and documents, and what it bills for them: the published limits
and token rules, with where each is published. Pure arithmetic, no I/O.

Limits are checked before a row is sent (a row over one is marked with the reason, never sent to be
refused); token rules feed `pipeline estimate`, the --tpm pacing and the spend ceiling's worst case.
Where a published figure has two readings (MB or MiB), the smaller is used: a row we refuse could
have passed, but a row we send is never refused for its size.

OpenAI (developers.openai.com, "Images and vision", image input requirements): PNG, JPEG, WEBP and
non-animated GIF; up to 20 MB per image, 500 images and 50 MB of image bytes per request. Tokens
("Calculating costs"): detail low is the base alone; high (and auto, counted as high) scales the image
to fit 2048 x 2048, then its short side to 768, and adds a tile's tokens per 512 px tile: 85 + 170 a
tile for gpt-4o, gpt-4.1 and most models, 70 + 140 for gpt-5, 75 + 150 for o1 and o3, 2833 + 5667 for
gpt-4o-mini, 65 + 129 for computer-use-preview. The patch models (gpt-4.1-mini, gpt-4.1-nano, o4-mini,
gpt-5-mini, gpt-5-nano) count 32 px patches, at most 1536 (a larger image is scaled down), times a
multiplier of the model. PDFs ("File inputs"): Chat
Completions takes them as `file` parts, base64 only, no URL; text and an image of each page go to the
model; 32 MB of files and 100 pages a request is the limit that guide gave when last read.

Anthropic (docs.claude.com, "Vision"): JPEG, PNG, GIF, WebP; at most 8000 x 8000 px (2000 x 2000 when
a request holds more than 20 images), 100 images a request for models with a 200k context (600 for
others: the smaller is used), 32 MB a request. An image over 5 MB is refused; the API measures its
base64 text (Claude Code's apiLimits.ts, API_IMAGE_MAX_BASE64_SIZE = 5 MiB of base64). Tokens are
width x height / 750, after a scale-down to a long edge of 1568 px and to about 1,600 tokens. PDFs
("PDF support"): 32 MB and 100 pages a request; each page costs its text (1,500 to 3,000 tokens) plus
an image.

ModelsLab (docs.modelslab.com, "LLM endpoint: files"): OpenAI's content parts, a PDF as a `file` part
whose file_data may also be a public URL; a request is at most 30 MB. Its models' token rules are not
published: OpenAI's are used, and `estimate` says so. Other OpenAI-compatible servers (vLLM, llama.cpp,
Ollama) get OpenAI's form and are held to OpenAI's limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.requests.media.kinds import IMAGES

MB = 1_000_000
# A PDF page: its text (1,500 to 3,000 tokens, as Anthropic publishes; OpenAI puts text and page images in
# context alike) and an image of the page at the rule's largest.
PAGE_TEXT_TYPICAL, PAGE_TEXT_MOST = 2_250, 3_000


@dataclass(frozen=True)
class Rules:
    """One provider's limits on images and documents, and its token rule for them."""

    name: str  # as messages say it: OpenAI, Anthropic, ModelsLab
    image_bytes: int  # most bytes of one image (raw, or base64 text when `b64_limit`)
    b64_limit: bool = False  # the image limit is on its base64 text (Anthropic), not its bytes
    request_bytes: int | None = None  # most base64 bytes of images and documents in one request
    image_request_bytes: int | None = None  # most raw bytes of images in one request (OpenAI's 50 MB)
    images_per_request: int = 100
    max_edge: int | None = None  # pixels on either side; larger is refused
    document_bytes: int = 32 * MB
    pages_per_request: int = 100
    document_urls: bool = False  # takes a PDF by URL (else a PDF URL is fetched and inlined)
    # The token rule: tiles (base, per tile), or patches (multiplier), or area (pixels a token).
    tiles: tuple[int, int] | None = None
    patches: float | None = None
    area: int | None = None
    detail: str | None = None  # OpenAI's image detail: low, high, auto (None: not sent, the model's auto)
    rule_text: str = ""  # the rule as `estimate` names it

    def image_tokens(self, size: tuple[int, int] | None) -> int:
        """Tokens one image costs by the published rule; the rule's most when the size is not known."""
        if size is None or min(size) <= 0:
            return self.image_most
        w, h = size
        if self.tiles is not None:
            return _tile_tokens(w, h, *self.tiles, low=self.detail == "low")
        if self.patches is not None:
            return math.ceil(_patches(w, h) * self.patches)
        assert self.area is not None
        return _area_tokens(w, h, self.area)

    @property
    def image_most(self) -> int:
        if self.tiles is not None:
            base, tile = self.tiles
            return base if self.detail == "low" else base + 8 * tile  # 2048 x 768: 4 x 2 tiles
        if self.patches is not None:
            return math.ceil(PATCH_CAP * self.patches)
        return AREA_CAP

    def document_tokens(self, pages: int | None) -> tuple[int, int]:
        """(typical, most) tokens of a PDF of `pages` pages; with the count unknown, one page and the
        most pages a request may hold."""
        page_image = self.image_most
        typical = (pages or 1) * (PAGE_TEXT_TYPICAL + page_image)
        return typical, (pages or self.pages_per_request) * (PAGE_TEXT_MOST + page_image)

    def too_big(self, mime: str, size: int) -> str | None:
        """Why one file of `size` bytes is over the limit ("is 7.1 MB, over ..."), or None."""
        if mime in IMAGES:
            shown = b64_size(size) if self.b64_limit else size
            if shown > self.image_bytes:
                as_text = f" ({_mb(shown)} as base64 text)" if self.b64_limit else ""
                return f"is {_mb(size)}{as_text}, {self.over(mime)}"
            return None
        if size > self.document_bytes:
            return f"is {_mb(size)}, {self.over(mime)}"
        return None

    def over(self, mime: str) -> str:
        if mime in IMAGES:
            as_text = " of base64 text" if self.b64_limit else ""
            return f"over {self.name}'s {_mb(self.image_bytes)}{as_text} for an image"
        return f"over {self.name}'s {_mb(self.document_bytes)} for a PDF"


PATCH_CAP = 1536
AREA_CAP = 1_600  # Anthropic: an image over ~1,600 tokens is scaled down first


def _tile_tokens(w: int, h: int, base: int, tile: int, *, low: bool) -> int:
    if low:
        return base
    scale = min(1.0, 2048 / max(w, h))  # fit a 2048 x 2048 square
    fw, fh = w * scale, h * scale
    scale = min(1.0, 768 / min(fw, fh))  # then the short side to 768
    fw, fh = fw * scale, fh * scale
    return base + tile * math.ceil(fw / 512) * math.ceil(fh / 512)


def _patches(w: int, h: int) -> int:
    """32 px patches covering the image, after OpenAI's scale-down to at most PATCH_CAP of them."""
    n = math.ceil(w / 32) * math.ceil(h / 32)
    if n <= PATCH_CAP:
        return n
    shrink = math.sqrt(PATCH_CAP * 32 * 32 / (w * h))
    sw, sh = w * shrink, h * shrink
    # Then down to a whole number of patches across, as the published example does.
    shrink *= min(math.floor(sw / 32) / (sw / 32), math.floor(sh / 32) / (sh / 32))
    return min(PATCH_CAP, math.ceil(w * shrink / 32) * math.ceil(h * shrink / 32))


def _area_tokens(w: int, h: int, pixels: int) -> int:
    scale = min(1.0, 1568 / max(w, h), math.sqrt(AREA_CAP * pixels / (w * h)))
    return min(AREA_CAP, math.ceil(w * scale * h * scale / pixels))


def b64_size(n: int) -> int:
    return 4 * math.ceil(n / 3)


def _mb(n: int) -> str:
    return f"{n / MB:,.1f} MB" if n >= 100_000 else f"{n / 1000:,.0f} kB"


# OpenAI's models whose rule differs from gpt-4o's tiles; the longest matching prefix wins.
_OPENAI_TILES = {"gpt-4o-mini": (2833, 5667), "o1": (75, 150), "o3": (75, 150), "gpt-5": (70, 140),
                 "computer-use-preview": (65, 129)}  # fmt: skip
_OPENAI_PATCHES = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72, "gpt-5-mini": 1.62, "gpt-5-nano": 2.46}


def rules_for(provider: str, model: str, detail: str | None = None) -> Rules:
    """The limits and token rule that apply to `model` at `provider` (local and OpenAI-compatible
    servers are held to OpenAI's)."""
    if provider == "anthropic":
        return Rules(
            name="Anthropic", image_bytes=5 * 1024 * 1024, b64_limit=True, request_bytes=32 * MB, images_per_request=100,
            max_edge=8000, document_bytes=32 * MB, pages_per_request=100, document_urls=True, area=750,
            rule_text="Anthropic's published rule: width x height / 750, scaled to a 1568 px long edge",
        )  # fmt: skip
    name = "ModelsLab" if provider == "modelslab" else "OpenAI"
    bare = model.rsplit("/", 1)[-1].lower()
    patches = next((v for k, v in sorted(_OPENAI_PATCHES.items(), key=lambda kv: -len(kv[0])) if bare.startswith(k)), None)
    tiles = next((v for k, v in sorted(_OPENAI_TILES.items(), key=lambda kv: -len(kv[0])) if bare.startswith(k)), (85, 170))
    if patches is not None:
        text = f"OpenAI's published rule for {model}: 32 px patches, at most {PATCH_CAP}, x {patches:g}"
    elif detail == "low":
        text = f"OpenAI's published rule, detail low: {tiles[0]} tokens an image"
    else:
        text = f"OpenAI's published rule: {tiles[0]} + {tiles[1]} per 512 px tile after scaling, detail high"
    if provider == "modelslab":
        text += " (ModelsLab publishes none of its own)"
    return Rules(
        name=name, image_bytes=20 * MB, request_bytes=30 * MB if provider == "modelslab" else None,
        image_request_bytes=50 * MB, images_per_request=500, document_bytes=32 * MB, pages_per_request=100,
        document_urls=provider == "modelslab", tiles=None if patches is not None else tiles, patches=patches,
        detail=detail, rule_text=text,
    )  # fmt: skip
