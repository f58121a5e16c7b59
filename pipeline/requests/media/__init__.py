"""Images and documents in requests (--image-column): from a cell to the part a provider takes.

    kinds.py    what a file is, from its bytes: the type, an image's pixel size, a PDF's pages
    sources.py  where a cell's bytes come from: a path, http(s)://, s3://, data:, a binary cell
    rules.py    each provider's published limits and token rules, cited
    columns.py  a batch's image cells read, checked and hashed into descriptors; the bytes read again to send

Memory stays flat in rows: a rendered batch holds a descriptor of each cell (its hash, type and
size), never its bytes; a request's bytes are read when it is built and dropped when it is answered.
"""

from pipeline.requests.media.columns import (
    MEDIA,
    MEDIA_BYTES,
    MEDIA_KEY,
    MEDIA_KIND,
    MEDIA_MOST,
    MEDIA_SKIP,
    MEDIA_TOKENS,
    MediaColumns,
)
from pipeline.requests.media.kinds import Attachment
from pipeline.requests.media.rules import Rules, rules_for
from pipeline.requests.media.sources import Unreadable

__all__ = [
    "MEDIA",
    "MEDIA_BYTES",
    "MEDIA_KEY",
    "MEDIA_KIND",
    "MEDIA_MOST",
    "MEDIA_SKIP",
    "MEDIA_TOKENS",
    "Attachment",
    "MediaColumns",
    "Rules",
    "Unreadable",
    "rules_for",
]
