"""Which image sources a request may name, and loading them.

`data:` URLs are always accepted. `http(s)://` URLs only with `--allow-remote-media`. Local files
(`file://` URLs) only under `--allowed-local-media-path DIR` (the resolved path must lie inside DIR, so `..`
and symlinks cannot leave it). Anything else is refused. Refusals are 400 errors with code
`media_not_allowed`.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen35.server.errors import APIError


@dataclass
class MediaPolicy:
    allow_remote: bool = False
    local_root: Path | None = None
    max_remote_bytes: int = 32 << 20
    timeout_s: float = 30.0

    def check(self, url: str, param: str) -> str:
        """Return the source to load (the URL, or a local path) or raise a 400 APIError."""
        if not isinstance(url, str) or not url:
            raise APIError("an image_url needs a non-empty url", 400, param=param, code="invalid_value")
        scheme = url[:16].split(":", 1)[0].lower() if ":" in url[:16] else ""
        if scheme == "data":
            return url
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise APIError("http(s) image URLs are not allowed on this server (start it with "
                               "--allow-remote-media); send the image as a data: URL", 400, param=param,
                               code="media_not_allowed")
            return url
        if scheme == "file":
            if self.local_root is None:
                raise APIError("local files are not allowed on this server (start it with "
                               "--allowed-local-media-path DIR); send the image as a data: URL", 400, param=param,
                               code="media_not_allowed")
            raw = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
            try:
                path = Path(raw).resolve()
                root = self.local_root.resolve()
            except (OSError, RuntimeError, ValueError) as e:
                raise APIError(f"bad file URL: {e}", 400, param=param, code="invalid_value") from None
            if path != root and root not in path.parents:
                raise APIError(f"file {raw!r} is outside the allowed media folder", 400, param=param,
                               code="media_not_allowed")
            if not path.is_file():
                raise APIError(f"image file not found: {raw!r}", 400, param=param, code="invalid_value")
            return os.fspath(path)
        raise APIError("an image url must be a data: URL (or an http(s) / file URL where the server allows it)",
                       400, param=param, code="invalid_value")

    def load(self, source: str, param: str) -> Any:
        """Decode an already checked source into a PIL image (blocking: call it in a worker thread)."""
        from qwen35.multimodal import MediaError, load_image

        try:
            return load_image(source, allow_remote=self.allow_remote, timeout=self.timeout_s,
                              max_bytes=self.max_remote_bytes)
        except MediaError as e:
            raise APIError(f"cannot read the image: {e}", 400, param=param, code="invalid_image") from None


__all__ = ["MediaPolicy"]
