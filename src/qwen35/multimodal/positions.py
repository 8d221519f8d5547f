"""M-RoPE position ids for any mix of text, images and video.

Text tokens get (p, p, p) with p counting up. An image, or one temporal patch of a video, starting at
position s gets (s, s + row, s + col) over its merged grid, and the text after it resumes at
s + max(h, w) / merge. Generated tokens continue at `index + delta`, delta = max position + 1 - length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def mrope_positions(input_ids: Sequence[int] | torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None, *, image_token_id: int = 248056,
                    video_token_id: int = 248057, merge_size: int = 2) -> tuple[torch.Tensor, int]:
    """-> (positions [3, n] long, delta). Grids are consumed in order; a mismatch between placeholder
    tokens and grids is a ValueError naming the counts."""
    ids = np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids), dtype=np.int64)
    n = len(ids)
    grids = {
        image_token_id: [tuple(int(v) for v in g) for g in (image_grid_thw.tolist() if image_grid_thw is not None
                                                            else [])],
        # each temporal patch of a video is its own group (timestamps separate them in the prompt)
        video_token_id: [(1, h, w) for t, h, w in (video_grid_thw.tolist() if video_grid_thw is not None else [])
                         for _ in range(int(t))],
    }
    used = {image_token_id: 0, video_token_id: 0}
    pos = np.zeros((3, n), dtype=np.int64)
    is_mm = (ids == image_token_id) | (ids == video_token_id)
    i, p = 0, 0
    while i < n:
        if not is_mm[i]:
            nxt = np.flatnonzero(is_mm[i:])
            j = i + (int(nxt[0]) if len(nxt) else n - i)
            pos[:, i:j] = np.arange(p, p + j - i)
            p += j - i
            i = j
            continue
        tok = int(ids[i])
        kind = "image" if tok == image_token_id else "video"
        k = used[tok]
        if k >= len(grids[tok]):
            raise ValueError(f"more {kind} placeholder groups in the prompt than {kind} grids given "
                             f"({len(grids[tok])})")
        t, h, w = grids[tok][k]
        used[tok] += 1
        gh, gw = h // merge_size, w // merge_size
        count = t * gh * gw
        if i + count > n or not (ids[i:i + count] == tok).all():
            run = int(np.argmax(ids[i:] != tok)) if (ids[i:] != tok).any() else n - i
            raise ValueError(f"{kind} {k} with grid {(t, h, w)} needs {count} <|{kind}_pad|> tokens, "
                             f"the prompt has a run of {run}")
        tt = np.repeat(np.arange(t), gh * gw)
        rows = np.tile(np.repeat(np.arange(gh), gw), t)
        cols = np.tile(np.arange(gw), t * gh)
        pos[0, i:i + count] = p + tt
        pos[1, i:i + count] = p + rows
        pos[2, i:i + count] = p + cols
        p += max(gh, gw)
        i += count
    for tok, name in ((image_token_id, "image"), (video_token_id, "video")):
        if used[tok] != len(grids[tok]):
            raise ValueError(f"{len(grids[tok])} {name} grids given but the prompt holds {used[tok]} {name} groups")
    delta = int(pos.max()) + 1 - n if n else 0
    return torch.from_numpy(pos), delta
