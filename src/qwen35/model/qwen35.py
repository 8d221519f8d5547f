"""The whole Qwen3.5 model: text model, head, optional MTP head and vision tower.

Two ways in:
  * `forward(input_ids [B, T], attention_mask)` -> logits [B, T, V]: the public, transformers-like call.
    Padded positions are dropped before any layer sees them, so they touch no real token and no state;
    each row is computed exactly as that sequence alone would be.
  * `forward_batch(input_ids [N], batch)` -> hidden [N, H]: the engine's varlen call over the hybrid cache.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qwen35.config import ModelConfig
from qwen35.model.cache import ForwardBatch, text_positions
from qwen35.model.decoder import TextModel
from qwen35.model.mtp import MTPHead
from qwen35.model.vision import VisionTower
from qwen35.multimodal.positions import mrope_positions
from qwen35.ops import cpu_kernels
from qwen35.ops.linear import Linear, linear
from qwen35.parallel import TensorParallel
from qwen35.parallel.layout import local_text_config


class Qwen35Model(nn.Module):
    def __init__(self, config: ModelConfig, with_mtp: bool | None = None, with_vision: bool | None = None,
                 tp: TensorParallel | None = None):
        """`tp`: this process is one rank of a tensor-parallel group and holds its share of every layer
        (qwen35.parallel.layout); `config` stays the whole model's, `cache_config` is the share's."""
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        cfg = config.text if self.tp is None else local_text_config(config.text, self.tp)
        self.cache_config = cfg  # what this process's hybrid cache holds: its heads only
        self.model = TextModel(cfg, self.tp)
        vocab = cfg.vocab_size // (self.tp.size if self.tp is not None else 1)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, vocab)
        if with_mtp is None:
            with_mtp = cfg.mtp_num_hidden_layers > 0
        if with_vision is None:
            with_vision = config.vision is not None
        self.mtp = MTPHead(cfg, self.tp) if with_mtp else None
        self.visual = VisionTower(config.vision) if with_vision and config.vision is not None else None
        self._head_screen = None  # see enable_head_screen

    @classmethod
    def on_meta(cls, config: ModelConfig, with_mtp: bool | None = None,
                with_vision: bool | None = None, tp: TensorParallel | None = None) -> Qwen35Model:
        """The model's structure on the meta device (shapes, no storage) for planning and checking a load.
        torch's random init is skipped: on meta tensors it runs through torch's reference kernels, whose first
        use imports torch._dynamo (~40 MiB that every later step of the process would carry)."""
        with torch.device("meta"), _skipped_init():
            return cls(config, with_mtp=with_mtp, with_vision=with_vision, tp=tp)

    # ------------------------------------------------------------------ pieces
    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the final norm: every format keeps norms in the model dtype)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def head_weight(self) -> torch.Tensor:
        """The head's weight (the embedding when tied); for a quantised head, the embedding, whose dtype
        and device are the model's."""
        return getattr(self.lm_head, "weight", self.model.embed_tokens.weight)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Head over final hidden states. `dtype=torch.float32` gives the GEMV's fp32 accumulators directly
        (what a sampler wants) instead of rounding them to the model dtype first. Under tensor parallelism
        every rank computes its vocabulary rows and all get the whole logits."""
        if self.tp is not None:
            return self.tp.all_gather_last(self._local_logits(hidden, dtype))
        return self._local_logits(hidden, dtype)

    def _local_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if self.lm_head is None:
            return linear(hidden, self.model.embed_tokens.weight, out_dtype=dtype)
        if isinstance(self.lm_head, Linear):
            return linear(hidden, self.lm_head.weight, out_dtype=dtype)
        logits = self.lm_head(hidden)  # e.g. the int8 head
        return logits if dtype is None else logits.to(dtype)

    def enable_head_screen(self) -> bool:
        """Build the int8 screen that gives greedy steps their token without the full bf16 logits (exact; see
        `qwen35.ops.head_screen`), where it applies: a bf16 head (not quantised) on CPU with the compiled
        kernels, and QWEN35_HEAD_SCREEN not "0". Costs a quarter of the head's memory again (254 MB on the 0.8B,
        whose head is the embedding). Returns whether the screen is on."""
        from qwen35.ops.head_screen import HeadScreen, head_screen_enabled

        if not head_screen_enabled():
            self._head_screen = None
            return False
        if self._usable_head_screen() is not None:
            return True
        weight = self._plain_head_weight()
        self._head_screen = HeadScreen(weight) if weight is not None and HeadScreen.supported(weight) else None
        return self._head_screen is not None

    def _plain_head_weight(self) -> torch.Tensor | None:
        """The weight `compute_logits` multiplies with `linear`; None for a quantised head (its own module)."""
        if self.lm_head is not None and not isinstance(self.lm_head, Linear):
            return None
        return self.head_weight

    def _usable_head_screen(self):
        """The screen, if it still describes the head that `compute_logits` uses (not moved, written or
        replaced, e.g. by quantisation, since it was built)."""
        screen = self._head_screen
        if screen is None or not screen.is_current() or self._plain_head_weight() is not screen.weight:
            return None
        return screen

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> [M] argmax of the fp32 logits (first index on ties), through the head screen
        when it is on and current; otherwise from the full logits."""
        if self.tp is not None:
            return self._sharded_greedy_tokens(hidden)
        screen = self._usable_head_screen()
        if screen is not None:
            return screen.argmax(hidden)
        return self.compute_logits(hidden, torch.float32).argmax(dim=-1)

    def _sharded_greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each rank's best of its vocabulary rows, then the best of those (the lowest id on ties, as argmax
        over the whole logits): two small gathers instead of the whole logits."""
        screen = self._usable_head_screen()  # over the rank's rows of the head
        if screen is not None:
            best, idx = screen.best(hidden)
        else:
            best, idx = self._local_logits(hidden, torch.float32).max(dim=-1)  # the first index of the max
        idx = idx + self.model.embed_tokens.vocab_range[0]
        bests = torch.stack(self.tp.all_gather_rows(best))  # [N, M]
        ids = torch.stack(self.tp.all_gather_rows(idx))
        top = bests.argmax(dim=0)  # the first rank that holds the max: its ids are the lowest
        return ids.gather(0, top[None])[0]

    @torch.inference_mode()
    def forward_batch(self, input_ids: torch.Tensor, batch: ForwardBatch,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Varlen forward of N new tokens (see ForwardBatch) -> final hidden states [N, H]."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if inputs_embeds.device.type == "cpu":
            cpu_kernels.flush_denormals()
        if inputs_embeds.shape[0] != batch.num_tokens:
            raise ValueError(f"{inputs_embeds.shape[0]} tokens given, the batch describes {batch.num_tokens}")
        return self.model(inputs_embeds, batch)

    @torch.inference_mode()
    def mtp_forward(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The MTP draft step -> draft logits [N, V]."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (the checkpoint has no mtp.* weights)")
        h = self.mtp(self.model.embed_tokens(next_token_ids), hidden, batch)
        return self.compute_logits(h)

    # ------------------------------------------------------------------ vision
    @torch.inference_mode()
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision tower features for images (or videos): [sum t*h*w/merge^2, hidden]."""
        if self.visual is None:
            raise ValueError(self.no_vision_message)
        return self.visual(pixel_values, grid_thw)

    @property
    def no_vision_message(self) -> str:
        """Why images are refused, for error messages: a GGUF never holds the vision tower."""
        if getattr(self, "gguf_path", None) is not None:
            return ("this model has no vision tower: a GGUF file holds the text model only (llama.cpp ships the "
                    "vision tower as a separate mmproj-*.gguf, which qwen35 does not read yet; load the "
                    "safetensors checkpoint for images and videos)")
        return "this model has no vision tower (the checkpoint has no model.visual.* weights)"

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              video_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with vision features placed, in order, at the <|image_pad|> / <|video_pad|> ids."""
        x = self.model.embed_tokens(input_ids)
        for feats, tok, name in ((image_embeds, self.config.image_token_id, "image"),
                                 (video_embeds, self.config.video_token_id, "video")):
            where = input_ids == tok
            n = int(where.sum())
            got = 0 if feats is None else feats.shape[0]
            if n != got:
                raise ValueError(f"the input has {n} <|{name}_pad|> tokens but the {name}s give {got} features")
            if n:
                x[where] = feats.to(x.dtype)
        return x

    # ------------------------------------------------------------------ public call
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """input_ids [B, T] int64; attention_mask [B, T] (1 = real token, 0 = padding) -> logits [B, T, V].
        Images / videos as in transformers: pixel rows from the processor and their (t, h, w) grids, in the
        order their placeholders appear (row by row). Logits at padded positions are 0."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        V = self.config.text.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids must be in [0, {V}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if (pixel_values_videos is None) != (video_grid_thw is None):
            raise ValueError("pixel_values_videos and video_grid_thw must be given together")
        if attention_mask is None:
            keep = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            keep = attention_mask.to(torch.bool)
        lens = keep.sum(1).tolist()
        flat_ids = input_ids[keep]
        image_embeds = None if pixel_values is None else self.encode_vision(pixel_values, image_grid_thw)
        video_embeds = None if pixel_values_videos is None else self.encode_vision(pixel_values_videos,
                                                                                   video_grid_thw)
        embeds = self.embed(flat_ids, image_embeds, video_embeds)
        positions = self._positions(flat_ids, lens, image_grid_thw, video_grid_thw)
        batch = ForwardBatch(query_lens=lens, context_lens=[0] * B, positions=positions)
        hidden = self.forward_batch(flat_ids, batch, inputs_embeds=embeds)
        logits = torch.zeros(B, T, V, dtype=hidden.dtype, device=hidden.device)
        logits[keep] = self.compute_logits(hidden)
        return logits

    def _positions(self, flat_ids: torch.Tensor, lens: list[int], image_grid_thw, video_grid_thw) -> torch.Tensor:
        if image_grid_thw is None and video_grid_thw is None:
            return text_positions([0] * len(lens), lens, flat_ids.device)
        merge = self.visual.cfg.spatial_merge_size if self.visual is not None else 2
        per_row, start = [], 0
        img_i = vid_i = 0
        for n in lens:
            row = flat_ids[start:start + n]
            start += n
            # hand each row the grids its placeholders use, in order
            n_img = self._count_groups(row, self.config.image_token_id, image_grid_thw, img_i, merge, False)
            n_vid = self._count_groups(row, self.config.video_token_id, video_grid_thw, vid_i, merge, True)
            pos, _ = mrope_positions(
                row, None if image_grid_thw is None else image_grid_thw[img_i:img_i + n_img],
                None if video_grid_thw is None else video_grid_thw[vid_i:vid_i + n_vid],
                image_token_id=self.config.image_token_id, video_token_id=self.config.video_token_id,
                merge_size=merge)
            img_i, vid_i = img_i + n_img, vid_i + n_vid
            per_row.append(pos.to(flat_ids.device))
        return torch.cat(per_row, dim=1)

    @staticmethod
    def _count_groups(row: torch.Tensor, tok: int, grids: torch.Tensor | None, first: int, merge: int,
                      video: bool) -> int:
        """How many of `grids` (from index `first`) the placeholders of this row consume."""
        n_tokens = int((row == tok).sum())
        k = 0
        while n_tokens > 0 and grids is not None and first + k < len(grids):
            t, h, w = (int(v) for v in grids[first + k])
            n_tokens -= t * h * w // merge**2
            k += 1
        return k


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _skipped_init():
    """torch.nn.init's in-place initialisers as no-ops (what the layers' reset_parameters call)."""
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)
