"""`pipeline estimate` for jobs with image columns: the images' tokens by each provider's published rule
(pipeline/requests/media/rules.py), their count, and sample requests that show each image as a short
stand-in instead of its base64.

Images are counted from the descriptors rendering made (type, size, pages; no bytes are read here
again): their tokens are added to the prompt's, typical and worst case, as the run's spend ceiling
reserves them; an image sent by URL (not fetched) counts at the rule's most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import polars as pl

from pipeline.requests.media import Attachment, Rules
from pipeline.requests.media.columns import file_name
from pipeline.requests.media.sources import Ref

# Per request row of the scan: the images' tokens and what kinds of them it carries.
COLUMNS = {"media_tokens": pl.Int64, "media_most": pl.Int64, "images": pl.Int32, "documents": pl.Int32, "by_url": pl.Int32}


@dataclass(frozen=True)
class MediaTotals:
    """The images and PDFs of the requests to send."""

    tokens: int = 0  # by the rule, typical
    most: int = 0  # by the rule, at most (URLs and PDFs of unknown pages at the rule's most)
    images: int = 0
    documents: int = 0
    by_url: int = 0  # sent as URLs, not fetched: their size and type are the provider's to find

    @property
    def items(self) -> int:
        return self.images + self.documents


def per_request(media: list[str | None] | None, tokens: list[int] | None, most: list[int] | None, n: int) -> pl.DataFrame:
    """The COLUMNS for one batch's rows, from the descriptors (zeros for a job without image columns)."""
    if media is None or tokens is None or most is None:
        return pl.DataFrame({k: [0] * n for k in COLUMNS}, schema=COLUMNS)
    described = pl.Series("m", media, dtype=pl.String)
    items = described.str.count_matches('"c":').fill_null(0)
    documents = described.str.count_matches('"m":"application/pdf"').fill_null(0)
    return pl.DataFrame(
        {
            "media_tokens": tokens,
            "media_most": most,
            "images": items - documents,
            "documents": documents,
            "by_url": described.str.count_matches('"d":null').fill_null(0),
        },
        schema=COLUMNS,
    )


def totals(row: dict[str, Any]) -> MediaTotals:
    return MediaTotals(
        int(row["media_tokens"] or 0),
        int(row["media_most"] or 0),
        int(row["images"] or 0),
        int(row["documents"] or 0),
        int(row["by_url"] or 0),
    )


def line(totals: MediaTotals, rules: Rules | None) -> str | None:
    """The report's line about images, or None when the requests carry none."""
    if not totals.items or rules is None:
        return None
    kinds = [f"{totals.images:,} image{'s' if totals.images != 1 else ''}"]
    if totals.documents:
        kinds.append(f"{totals.documents:,} PDF{'s' if totals.documents != 1 else ''}")
    url = f"; {totals.by_url:,} sent by URL, not fetched, counted at the rule's most" if totals.by_url else ""
    most = f", at most {totals.most:,}" if totals.most != totals.tokens else ""
    pdf = "; a PDF page as 1,500 to 3,000 tokens of text plus a page image" if totals.documents else ""
    return (
        f"  images: {' and '.join(kinds)} in the requests to send: about {totals.tokens:,} tokens{most}, by "
        f"{rules.rule_text}{pdf}{url} (included in the tokens in below)"
    )


def placeholders(descriptor: str | None) -> list[Attachment]:
    """The row's attachments without their bytes (nothing is read again): `stand_ins` shows them."""
    if not descriptor:
        return []
    return [
        Attachment(item["m"], None, url=item["w"])
        if item["d"] is None
        else Attachment(item["m"], b"", name=file_name(Ref(item["s"], item["w"], item["v"]), item["m"]))
        for item in orjson.loads(descriptor)
    ]


def stand_ins(body: dict[str, Any], descriptor: str | None) -> dict[str, Any]:
    """`body` with each image's and PDF's base64 replaced by what it is (type, size, where from): a
    sample request is read on a screen, and 50 kB of base64 says nothing there."""
    if not descriptor:
        return body
    items = iter(orjson.loads(descriptor))

    def shown() -> str:
        item = next(items, None)
        return "…" if item is None else f"… [{item['m']}, {item['n']:,} bytes: {item['v']}]"

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            kind = value.get("type")
            if kind == "image_url" and str(value["image_url"].get("url", "")).startswith("data:"):
                url = value["image_url"]["url"]
                return {**value, "image_url": {**value["image_url"], "url": url.split(",", 1)[0] + "," + shown()}}
            if kind == "file" and str(value["file"].get("file_data", "")).startswith("data:"):
                data = value["file"]["file_data"]
                return {**value, "file": {**value["file"], "file_data": data.split(",", 1)[0] + "," + shown()}}
            if kind in ("image", "document") and (value.get("source") or {}).get("type") == "base64":
                return {**value, "source": {**value["source"], "data": shown()}}
            if kind in ("image_url", "file", "image", "document"):
                next(items, None)  # sent by URL: shown as it is
                return value
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return dict(walk(body))
