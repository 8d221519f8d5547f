"""The text of one generated sequence: incremental detokenisation and stop strings.

Stop strings are searched in the text, not in tokens, so a stop string split over several tokens (or ending
inside a token) is found; the text is cut right before it (or after it with `include_stop_str_in_output`).
While a sequence runs, the last `max_stop_len - 1` characters are held back from what may be shown, since
they could be the start of a stop string: nothing that a stop string later removes is ever streamed.
"""

from __future__ import annotations

from typing import Any


class OutputText:
    def __init__(self, tokenizer: Any | None, stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        self._detok = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens) if tokenizer else None
        # The model's vocabulary is padded past the tokenizer's (248320 vs 248077 ids): the padding ids have no
        # text. A trained model never picks them, a random one may.
        self._num_ids = tokenizer.vocab_size if tokenizer else 0
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.done = False

    def append(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add one generated token; return the stop string it completed, if any (the text is then final)."""
        if self._detok is None or self.done or not 0 <= token_id < self._num_ids:
            return None
        new = self._detok.add(token_id)
        if not new:
            return None
        # A stop string may begin in the last `hold` characters of the old text.
        search_from = max(0, len(self.text) - self.hold)
        self.text += new
        if not check_stop or not self.stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.done = True
        return s

    def finish(self) -> None:
        """The sequence ended for another reason than a stop string: flush bytes held by the decoder."""
        if self._detok is not None and not self.done:
            self.text += self._detok.finish()
        self.done = True

    @property
    def visible(self) -> str:
        """The text that can be shown now (all of it once finished)."""
        if self.done or self.hold == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
