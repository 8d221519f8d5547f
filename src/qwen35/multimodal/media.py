"""Loading images and videos from the ways a caller can name them.

Accepted sources: a PIL image (images only), a filesystem path (``str`` or ``os.PathLike``), ``file://`` URLs,
raw ``bytes``, ``data:`` URLs (base64), and ``http(s)://`` URLs only when the caller passes ``allow_remote=True``:
an engine that serves untrusted requests must not fetch arbitrary URLs on their behalf by default.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
import urllib.request
import warnings
from typing import Any

from PIL import Image, ImageOps

__all__ = ["MediaError", "fetch_bytes", "load_image", "open_video_source", "DEFAULT_MAX_REMOTE_BYTES"]

# Refuse remote downloads larger than this: a URL must not be able to fill memory.
DEFAULT_MAX_REMOTE_BYTES = 256 * 1024 * 1024

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


class MediaError(ValueError):
    """A media source that cannot be read (unknown form, missing file, undecodable data, refused URL)."""


def _describe(source: Any) -> str:
    text = repr(source)
    return text if len(text) <= 80 else text[:77] + "..."


def _decode_data_url(url: str) -> bytes:
    # data:[<mediatype>][;base64],<data>  (RFC 2397)
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("malformed data: URL (no ',' separating header and payload)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload.strip(), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data: URL holds invalid base64: {exc}") from exc
    # Non-base64 data URLs are percent-encoded bytes.
    return urllib.parse.unquote_to_bytes(payload)


def fetch_bytes(
    url: str, *, allow_remote: bool = False, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_REMOTE_BYTES
) -> bytes:
    """Download an ``http(s)://`` URL, refusing unless ``allow_remote`` and capping the size at ``max_bytes``."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"not an http(s) URL: {_describe(url)}")
    if not allow_remote:
        raise MediaError(
            f"remote media URL refused: {_describe(url)}; pass allow_remote=True to let the engine download it"
        )
    request = urllib.request.Request(url, headers={"User-Agent": "qwen35"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            data = response.read(max_bytes + 1)
    except OSError as exc:
        raise MediaError(f"could not download {_describe(url)}: {exc}") from exc
    if len(data) > max_bytes:
        raise MediaError(f"remote media {_describe(url)} is larger than {max_bytes} bytes")
    return data


def _source_to_bytes_or_path(
    source: Any, *, allow_remote: bool, timeout: float, max_bytes: int, kind: str
) -> bytes | str:
    """Resolve a non-PIL source into either the raw bytes or a local file path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise MediaError(f"empty {kind} bytes")
        return data
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise MediaError(f"unsupported {kind} source of type {type(source).__name__}")
    if not source:
        raise MediaError(f"empty {kind} source string")
    lowered = source[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return fetch_bytes(source, allow_remote=allow_remote, timeout=timeout, max_bytes=max_bytes)
    if lowered.startswith("data:"):
        data = _decode_data_url(source)
        if not data:
            raise MediaError(f"data: URL holds no {kind} data")
        return data
    if lowered.startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlsplit(source).path)
        if not os.path.isfile(path):
            raise MediaError(f"{kind} file not found: {path}")
        return path
    if os.path.isfile(source):
        return source
    # The reference loader also accepts a bare base64 string; only try that when it looks like one, so that a
    # mistyped path gets a "not found" message instead of a base64 error.
    if len(source) >= 64 and _BASE64_RE.match(source):
        try:
            data = base64.b64decode(source, validate=False)
        except (binascii.Error, ValueError):
            data = b""
        if data:
            return data
    raise MediaError(
        f"{kind} source not understood: {_describe(source)} is not an existing file, a data: URL, "
        "an http(s) URL or base64 data"
    )


def load_image(
    source: Any,
    *,
    allow_remote: bool = False,
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_REMOTE_BYTES,
) -> Image.Image:
    """Return a decoded PIL image from a PIL image, path, bytes, ``data:`` URL or (if allowed) http(s) URL.

    A PIL image is returned unchanged. Anything read from a file or bytes is fully decoded here (so a broken file
    fails now, with a ValueError) and turned upright by its EXIF orientation, as the reference ``load_image``
    does. The mode is kept; RGB conversion (compositing transparency on white) is the image processor's job.
    """
    if isinstance(source, Image.Image):
        return source
    resolved = _source_to_bytes_or_path(source, allow_remote=allow_remote, timeout=timeout, max_bytes=max_bytes,
                                        kind="image")
    fp: Any = io.BytesIO(resolved) if isinstance(resolved, bytes) else resolved
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning is only a hint; the error (over 2x the limit) is still raised.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
            image.load()
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for unreadable or truncated data
        raise MediaError(f"cannot decode image {_describe(source)}: {exc}") from exc
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # a corrupt EXIF block must not make an otherwise good image unusable
        warnings.warn(f"ignoring unreadable EXIF orientation: {exc}", stacklevel=2)
        upright = image
    return upright if upright is not None else image


def open_video_source(
    source: Any,
    *,
    allow_remote: bool = False,
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_REMOTE_BYTES,
) -> str | io.BytesIO:
    """Return something ``av.open`` accepts: a local path, or an in-memory file for bytes / data: / http(s)."""
    if isinstance(source, io.IOBase):
        return source  # type: ignore[return-value]
    resolved = _source_to_bytes_or_path(source, allow_remote=allow_remote, timeout=timeout, max_bytes=max_bytes,
                                        kind="video")
    return io.BytesIO(resolved) if isinstance(resolved, bytes) else resolved
