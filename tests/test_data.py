"""Reading datasets: shapes, encodings, and every bad row reported as path:line, field and reason."""

import json
import re

import pytest

from chatlora.data.dataset import DataSpec, build_dataset, split_held_out
from chatlora.data.rows import read_conversations
from chatlora.errors import UserError
from chatlora.models.tokenizer import tokenizer_fingerprint
from chatlora.templates import IGNORE, chat_format


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def jsonl(*rows):
    return "\n".join(json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r for r in rows) + "\n"


ALPACA = {"instruction": "问", "input": "", "output": "答"}


def test_three_shapes_give_the_same_conversation(tmp_path):
    rows = [
        {"instruction": "问", "input": "补充", "output": "答", "system": "S", "history": [["q0", "a0"]]},
        {"system": "S", "conversations": [{"from": "human", "value": "q0"}, {"from": "gpt", "value": "a0"},
                                          {"from": "human", "value": "问\n补充"}, {"from": "gpt", "value": "答"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                      {"role": "assistant", "content": "a0"}, {"role": "user", "content": "问\n补充"},
                      {"role": "assistant", "content": "答"}]},
    ]
    result = read_conversations(write(tmp_path, "d.jsonl", jsonl(*rows)))
    assert not result.errors
    assert [c.shape for c in result.conversations] == ["alpaca", "sharegpt", "messages"]
    first = result.conversations[0].messages
    assert all(c.messages == first for c in result.conversations)


def test_json_array_with_bom_crlf_and_line_numbers(tmp_path):
    text = "\ufeff[\r\n  " + json.dumps(ALPACA, ensure_ascii=False) + ",\r\n\r\n  " + \
           json.dumps({"instruction": "x", "output": ""}) + "\r\n]\r\n"
    result = read_conversations(write(tmp_path, "d.json", text))
    assert result.rows == 2 and len(result.conversations) == 1
    assert result.conversations[0].line == 2
    assert str(result.errors[0]) == f"{tmp_path / 'd.json'}:4: output: is empty"


def test_jsonl_blank_lines_and_system_prompt_default(tmp_path):
    path = write(tmp_path, "d.jsonl", "\r\n" + jsonl(ALPACA) + "\n\n" + jsonl(dict(ALPACA, system="own")))
    result = read_conversations(path, system_prompt="default")
    assert [c.line for c in result.conversations] == [2, 5]
    assert [c.messages[0]["content"] for c in result.conversations] == ["default", "own"]


@pytest.mark.parametrize("row, field, reason", [
    ('{"instruction": "q", "output": "a"', "", "malformed JSON"),
    ({"instruction": "q"}, "output", "missing"),
    ({"instruction": "  ", "output": "a"}, "instruction", "is empty"),
    ({"instruction": 5, "output": "a"}, "instruction", "must be a string, got int"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]", "pair"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from", "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversations", "must end with an assistant"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, "conversations[0]", "expected a user turn"),
    ({"conversations": "text"}, "conversations", "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "messages[1].content", "missing"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["x"]}]},
     "messages[1].content", "must be a string, got list"),
    ([1, 2], "", "must be a JSON object, got list"),
    ({"prompt": "q", "completion": "a"}, "", "unknown row shape"),
])
def test_bad_rows_name_line_field_and_reason(tmp_path, row, field, reason):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, row, ALPACA))
    result = read_conversations(path)
    assert len(result.conversations) == 2 and len(result.errors) == 1
    err = result.errors[0]
    assert (err.line, err.field) == (2, field) and reason in err.reason
    assert str(err).startswith(f"{path}:2")


def test_malformed_json_has_column(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, '{"instruction": "q", "output": }'))
    err = read_conversations(path).errors[0]
    assert (err.line, err.column) == (2, 32) and str(err).startswith(f"{path}:2:32: malformed JSON")


def test_json_array_syntax_error_is_fatal_with_line_and_column(tmp_path):
    path = write(tmp_path, "d.json", '[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": 1}\n]')
    result = read_conversations(path)
    assert result.fatal and len(result.conversations) == 1
    assert (result.errors[0].line, result.errors[0].column) == (3, 22)


def test_invalid_utf8_reports_byte_offset_and_line(tmp_path):
    good = jsonl(ALPACA).encode()
    raw = good + b'{"instruction": "\xff\xfe", "output": "a"}\n' + good
    result = read_conversations(write(tmp_path, "d.jsonl", raw))
    err = result.errors[0]
    assert err.line == 2 and f"byte offset {len(good) + 17}" in err.reason
    assert len(result.conversations) == 2
    array = b"\xef\xbb\xbf[" + raw.replace(b"\n", b",\n")[:-2] + b"]"  # with a BOM: offsets count it
    result = read_conversations(write(tmp_path, "d.json", array))
    assert result.fatal and result.errors[0].line == 2
    assert "invalid UTF-8 at byte offset %d" % array.index(b"\xff") in result.errors[0].reason


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_conversations(tmp_path / "none.json")


# ---------------------------------------------------------------- tokenized dataset


def spec_for(path, **kw):
    return DataSpec(str(path), kw.pop("system_prompt", "S"), kw.pop("max_seq_tokens", 64), **kw)


def build(path, index_tok, index_dir, rejects_path=None, use_cache=True, **kw):
    fmt = chat_format("index", index_tok)
    return build_dataset(spec_for(path, **kw), index_tok, fmt, tokenizer_fingerprint(index_dir),
                         rejects_path=rejects_path, use_cache=use_cache)


def test_stop_lists_every_bad_row(tmp_path, index_tok, index_dir):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, {"instruction": "q"}, ALPACA, {"output": 3}))
    with pytest.raises(UserError) as e:
        build(path, index_tok, index_dir)
    message = str(e.value)
    assert f"{path}:2: output: missing" in message and f"{path}:4: instruction: missing" in message
    assert "--on-error skip" in message


def test_skip_counts_and_writes_rejects(tmp_path, index_tok, index_dir):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, {"instruction": "q"}, ALPACA))
    rejects = tmp_path / "rejects.jsonl"
    fmt = chat_format("index", index_tok)
    ds = build_dataset(spec_for(path, on_error="skip"), index_tok, fmt, "k", rejects_path=rejects)
    assert ds.report["rows_rejected"] == 1 and ds.report["examples_kept"] == 2
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert rejected == [{"line": 2, "error": f"{path}:2: output: missing", "row": {"instruction": "q"}}]


def test_overlength_truncate_drop_error(tmp_path, index_tok, index_dir):
    long = {"instruction": "问", "output": "很长的回答。" * 40}
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, long))
    ds = build(path, index_tok, index_dir, max_seq_tokens=20)
    assert ds.report["truncated"] == 1 and max(len(e.input_ids) for e in ds.train) == 20
    ds = build(path, index_tok, index_dir, max_seq_tokens=20, on_overlength="drop")
    assert ds.report["dropped"] == {"too_long": 1} and ds.report["examples_kept"] == 1
    with pytest.raises(UserError, match=rf"{path}:2: \d+ tokens"):
        build(path, index_tok, index_dir, max_seq_tokens=20, on_overlength="error")


def test_example_without_supervised_tokens_is_dropped(tmp_path, index_tok, index_dir):
    long_prompt = {"instruction": "很长的问题。" * 40, "output": "答"}
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, long_prompt))
    ds = build(path, index_tok, index_dir, max_seq_tokens=20)
    assert ds.report["dropped"] == {"no_supervised_tokens": 1} and ds.report["examples_kept"] == 1
    assert all(any(x != IGNORE for x in e.labels) for e in ds.train)


def test_report_duplicates_and_percentiles(tmp_path, index_tok, index_dir):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, ALPACA, ALPACA, {"instruction": "别的", "output": "答"}))
    report = build(path, index_tok, index_dir).report
    assert report["duplicates"] == 2 and report["rows_read"] == 4
    t = report["tokens"]
    assert t["p50"] <= t["p90"] <= t["p99"] <= t["max"] and t["supervised"] < t["total"]


def test_cache_is_used_and_keyed_by_system_prompt(tmp_path, index_tok, index_dir, monkeypatch):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, {"instruction": "二", "output": "三"}))
    first = build(path, index_tok, index_dir)
    from chatlora import templates

    def fail(self, messages):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(templates.IdFormat, "render", fail)
    second = build(path, index_tok, index_dir)
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]
    assert second.report == first.report
    with pytest.raises(AssertionError, match="re-tokenized"):
        build(path, index_tok, index_dir, system_prompt="other")


def test_held_out_split_is_seeded_and_disjoint():
    from chatlora.data.dataset import Example

    examples = [Example([i], [i], i) for i in range(100)]
    train, held = split_held_out(examples, 0.1, seed=7)
    again, held_again = split_held_out(examples, 0.1, seed=7)
    assert len(held) == 10 and len(train) == 90 and held == held_again and train == again
    assert {e.line for e in train}.isdisjoint({e.line for e in held})
    assert split_held_out(examples, 0.1, seed=8)[1] != held
    assert split_held_out(examples[:1], 0.5, seed=1) == (examples[:1], [])


def test_cached_report_names_the_file_asked_for(tmp_path, index_tok, index_dir):
    text = jsonl(ALPACA, {"instruction": "四", "output": "五"})
    first = build(write(tmp_path, "a.jsonl", text), index_tok, index_dir)
    second = build(write(tmp_path, "b.jsonl", text), index_tok, index_dir)  # same bytes: a cache hit
    assert first.report["file"].endswith("a.jsonl") and second.report["file"].endswith("b.jsonl")


# ---------------------------------------------------------------- whatever the bytes: rows or file:line errors


def test_deep_nesting_and_huge_numbers_are_row_errors(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    digits = '{"instruction": "q", "output": "a", "n": ' + "7" * 5000 + "}"
    result = read_conversations(write(tmp_path, "d.jsonl", jsonl(ALPACA, deep, digits, ALPACA)))
    assert [e.line for e in result.errors] == [2, 3]
    assert result.errors[0].reason == "malformed JSON (nested too deeply)"
    assert result.errors[1].reason.startswith("malformed JSON (Exceeds the limit (4300 digits)")
    assert len(result.conversations) == 2 and result.rows == 4
    array = read_conversations(write(tmp_path, "d.json", "[\n" + json.dumps(ALPACA) + ",\n" + deep + "\n]"))
    assert array.fatal and array.errors[0].line == 3 and "nested too deeply" in array.errors[0].reason


def test_lone_surrogates_are_row_errors_and_their_rejects_are_written(tmp_path, index_tok, index_dir):
    bad = '{"instruction": "q\\ud800", "output": "a"}'
    history = '{"instruction": "q", "output": "a", "history": [["x", "\\udfff"]]}'
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, bad, history))
    result = read_conversations(path)
    assert [(e.line, e.field) for e in result.errors] == [(2, "instruction"), (3, "history[0][1]")]
    assert "lone surrogate (U+D800) at character 1" in result.errors[0].reason
    rejects = tmp_path / "rejects.jsonl"
    ds = build(path, index_tok, index_dir, on_error="skip", rejects_path=rejects)
    assert ds.report["examples_kept"] == 1
    rows = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["row"]["instruction"] == "q\ud800"   # written escaped, read back the same


def test_jsonl_whose_rows_are_arrays_is_read_as_jsonl(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([1, 2], ALPACA, ["x"]))
    result = read_conversations(path)
    assert [(e.line, e.reason) for e in result.errors] == [(1, "a row must be a JSON object, got list"),
                                                           (3, "a row must be a JSON object, got list")]
    assert len(result.conversations) == 1 and not result.fatal
    one_line_array = read_conversations(write(tmp_path, "a.json", json.dumps([ALPACA, ALPACA])))
    assert len(one_line_array.conversations) == 2


def test_unreadable_paths_and_empty_files_are_user_errors(tmp_path, index_tok, index_dir, monkeypatch):
    with pytest.raises(UserError, match="data folder .* holds no data files"):
        build(tmp_path, index_tok, index_dir)
    for text in ("", "\n\n", "[]", "\ufeff[ ]\n"):
        with pytest.raises(UserError, match="holds no rows"):
            build(write(tmp_path, "empty.jsonl", text), index_tok, index_dir)
    path = write(tmp_path, "locked.jsonl", jsonl(ALPACA))
    real = type(path).read_bytes
    monkeypatch.setattr(type(path), "read_bytes",   # root reads anything; this is what a 0600 file gives others
                        lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "locked.jsonl" else real(self))
    with pytest.raises(UserError, match="cannot read data file .*locked.jsonl: Permission denied"):
        build(path, index_tok, index_dir)


def test_a_second_skip_replaces_its_own_rejects_file_but_no_other(tmp_path, index_tok, index_dir):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, {"instruction": "q"}))
    rejects = tmp_path / "rejects.jsonl"
    for _ in range(2):
        assert build(path, index_tok, index_dir, on_error="skip", rejects_path=rejects).report["rows_rejected"] == 1
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my notes\n")
    with pytest.raises(UserError, match="already exists"):
        build(path, index_tok, index_dir, on_error="skip", rejects_path=mine)
    assert mine.read_text() == "my notes\n"


def test_malformed_lines_count_as_rows_read(tmp_path, index_tok, index_dir):
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA, "{not json", ALPACA).encode() + b'{"instruction": "\xff"}\n')
    report = build(path, index_tok, index_dir, on_error="skip", rejects_path=tmp_path / "r.jsonl").report
    assert (report["rows_read"], report["rows_rejected"], report["examples_kept"]) == (4, 2, 2)


def random_value(rng, depth=0):
    keys = ["instruction", "input", "output", "system", "history", "conversations", "messages", "role",
            "content", "from", "value", "human", "gpt", "user", "assistant"]
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice(["", " ", "问", "a\ud800b", "reserved_0", "<|im_start|>", "x" * rng.randrange(50), "\x00"])
    if kind == 1:
        return rng.choice([0, -1, 10 ** 30, 1.5, float("inf")])
    if kind == 2:
        return rng.choice([None, True, False])
    if kind in (3, 4):
        return rng.choice(keys)
    if kind in (5, 6):
        return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_file(rng) -> bytes:
    rows = [random_value(rng) for _ in range(rng.randrange(1, 6))]
    if rng.random() < 0.5:
        rows += [{"instruction": "问", "output": "答"}]
    if rng.random() < 0.5:
        text = "\n".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows)
    else:
        text = json.dumps(rows, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
    raw = text.encode("utf-8", "surrogatepass")
    for _ in range(rng.randrange(4)):   # corruption: flipped, cut or inserted bytes, a BOM, CRLF
        if not raw:
            break
        at = rng.randrange(len(raw))
        raw = rng.choice([raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:], raw[:at],
                          raw[:at] + b"\xef\xbb\xbf" + raw[at:], raw.replace(b"\n", b"\r\n"), b"\xef\xbb\xbf" + raw])
    return raw


def test_fuzz_random_bytes_and_json_give_rows_or_file_line_errors(tmp_path, index_tok, index_dir):
    """A few hundred random and damaged files: every outcome is a dataset or a UserError whose
    lines name the file (and a line), never another exception."""
    import random

    from chatlora.errors import UserError as Refused

    rng = random.Random(1234)
    outcomes = {"dataset": 0, "refused": 0}
    for i in range(400):
        path = write(tmp_path, f"f{i}.jsonl", random_file(rng) if i % 4 else bytes(rng.randrange(256)
                                                                                    for _ in range(rng.randrange(200))))
        for on_error in ("stop", "skip"):
            try:
                build(path, index_tok, index_dir, on_error=on_error, rejects_path=tmp_path / f"r{i}-{on_error}.jsonl",
                      use_cache=False)
                outcomes["dataset"] += 1
            except Refused as e:
                outcomes["refused"] += 1
                message = str(e)
                assert str(path) in message, message
                if "bad row" in message:
                    assert re.search(rf"{re.escape(str(path))}:\d+", message), message
    assert outcomes["dataset"] > 50 and outcomes["refused"] > 50, outcomes
