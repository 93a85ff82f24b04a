"""Index tokenizer parity: exactly SentencePieceProcessor.encode between special tokens."""

import pytest
import sentencepiece

TEXTS = [
    "现在你要扮演皇帝身边的女人--甄嬛",
    "皇上万福金安。臣妾是大理寺少卿甄远道之女。",
    "The quick brown fox jumps over the lazy dog.",
    " leading space", "   three leading spaces", "trailing space ", "two  inner  spaces",
    "line one\nline two\n", "\n\nstarts with newlines", "crlf\r\nline", "tab\there",
    "digits 1234567890 and 3.14159", "emoji 😀🎉 and 中文 mixed with English", "",
    " ", "reserved", "<unk", "</s >",
]


@pytest.fixture(scope="module")
def sp(sp_model_file):
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model_file))


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_matches_sentencepiece(index_tok, sp, text):
    assert index_tok.encode(text) == sp.encode(text)


def test_index_special_ids_and_no_bos(index_tok):
    assert index_tok.encode("<unk><s></s>reserved_0reserved_1") == [0, 1, 2, 3, 4]
    assert index_tok.eos_id == 2 and index_tok.pad_id == 0
    assert index_tok.encode("你好")[0] != 1, "no BOS is added"


@pytest.mark.parametrize("text", ["a reserved_0 b", "reserved_1\n回答", "问题reserved_0 你好 reserved_1答",
                                  " x</s> y<unk>z"])
def test_special_tokens_split_then_sentencepiece_between(index_tok, sp, text):
    import re

    expected = []
    for part in re.split(r"(<unk>|<s>|</s>|reserved_0|reserved_1)", text):
        specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "reserved_0": 3, "reserved_1": 4}
        expected += [specials[part]] if part in specials else sp.encode(part) if part else []
    assert index_tok.encode(text) == expected


def test_matches_transformers_sentencepiece_backend_legacy(index_tok, sp_model_file):
    """A second, independent reference: transformers' own sentencepiece tokenizer with legacy=True,
    which calls sp_model.encode unchanged (docs/index-model.md, "Trap")."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    ref = SentencePieceBackend(vocab_file=str(sp_model_file), legacy=True, unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                               additional_special_tokens=["reserved_0", "reserved_1"])
    for text in TEXTS + ["<unk>system甄嬛reserved_0user你好reserved_1assistant"]:
        assert index_tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_decode_round_trip(index_tok):
    text = "皇上万福金安。 Hello 😀"
    assert index_tok.decode(index_tok.encode(text)) == text
    assert index_tok.decode([3] + index_tok.encode("问") + [4], skip_special=False) == "reserved_0问reserved_1"


def test_ids_beyond_the_tokenizer_decode_to_nothing(index_tok):
    """Index's embedding is larger than its sentencepiece vocabulary; such ids must not crash a reply."""
    good = index_tok.encode("你好") + index_tok.encode("皇上")
    ids = good[:2] + [index_tok.vocab_size + 5] + good[2:]
    assert index_tok.decode(ids) == index_tok.decode(good) and "皇上" in index_tok.decode(ids)


@pytest.mark.parametrize("which", ["index", "smollm2"])
def test_streamed_text_is_the_whole_decode(which, index_tok, smollm2_tok):
    """TextStream's increments, decoded from short windows, add up to decoding the whole reply after
    every token (but an incomplete character at the end): for replies encoded from text (Chinese,
    an emoji in byte fallback, runs of spaces, a leading space) and for random ids."""
    import random

    from chatlora.models.tokenizer import TextStream

    tok = index_tok if which == "index" else smollm2_tok
    rng = random.Random(0)
    texts = ["嬛嬛，朕今日政务繁忙，你陪朕说说话。 Hello,  world!\n\n  Indented line.", "臣妾做不到啊 🙂 ✓ ok",
             "a b  c   d", " leading space", "数字 12345 and mixed 中英 text."]
    replies = [tok.encode(t) for t in texts] + [[rng.randrange(tok.vocab_size) for _ in range(300)] for _ in range(5)]
    for ids in replies:
        stream, streamed = TextStream(tok), ""
        for i, token in enumerate(ids):
            streamed += stream.push(token)
            whole = tok.decode(ids[:i + 1])
            assert whole.startswith(streamed)
            if not whole.endswith("\ufffd"):   # else an incomplete character is held back
                assert streamed == whole
        assert stream.text() == tok.decode(ids).rstrip("\ufffd")
