"""Data from anywhere (data/sources.py): CSV/TSV, Parquet, Arrow, folders and cached hub datasets give
the same conversations and token ids as the JSON rows they hold, and every bad row is named by its
file and line (text files) or row (tables), with the field or column."""

import json

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from chatlora.data.dataset import DataSpec, build_dataset, dump_examples
from chatlora.data.sources import read_source
from chatlora.errors import UserError
from chatlora.models.hub import dataset_dir

ROWS = [
    {"instruction": "你是谁？", "output": "臣妾甄嬛。"},
    {"instruction": "说\"一句\"话,\n两行", "input": "补充", "output": "好，\n皇上。", "system": "S2"},
    {"instruction": "再说一遍？", "output": "好。", "history": [["你是谁？", "臣妾甄嬛。"]]},
]
MESSAGES = [{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "a2"}]}]


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(data, index_tok, index_dir, held_out_fraction=0.0):
    from chatlora.models.tokenizer import tokenizer_fingerprint
    from chatlora.templates import chat_format

    spec = DataSpec(str(data), "S", 64, held_out_fraction=held_out_fraction)
    return build_dataset(spec, index_tok, chat_format("index", index_tok), tokenizer_fingerprint(index_dir))


def csv_text(rows, delimiter=","):
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(["instruction", "input", "output", "system", "history"])
    for r in rows:
        writer.writerow([r.get("instruction", ""), r.get("input", ""), r.get("output", ""), r.get("system", ""),
                         json.dumps(r["history"], ensure_ascii=False) if "history" in r else ""])
    return out.getvalue()


def messages_of(result):
    return [c.messages for c in result.conversations]


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_rows_are_the_json_rows(tmp_path, index_tok, index_dir, suffix, delimiter):
    """Quoted cells with commas, quotes and newlines, a history column in JSON, CRLF, a BOM: the same
    conversations and token ids as the JSONL file with the same rows."""
    table = write(tmp_path, f"t{suffix}", "\ufeff" + csv_text(ROWS, delimiter))   # with a BOM
    lines = write(tmp_path, "t.jsonl", jsonl(*ROWS))
    assert messages_of(read_source(table)) == messages_of(read_source(lines))
    a, b = build(table, index_tok, index_dir), build(lines, index_tok, index_dir)
    assert [e.input_ids for e in a.train] == [e.input_ids for e in b.train]
    assert [e.labels for e in a.train] == [e.labels for e in b.train]


def test_csv_errors_name_the_line_and_column(tmp_path):
    rows = ROWS[:1] + [{"instruction": "q"}] + ROWS[1:2] + [{"instruction": "q", "output": "a"}]
    text = csv_text(rows) + 'q,,a,,"[not json"\r\n' + "only,three,cells\r\n"
    result = read_source(write(tmp_path, "bad.csv", text))
    errors = [str(e) for e in result.errors]
    assert errors == [f"{tmp_path}/bad.csv:3: output: is empty",
                      f"{tmp_path}/bad.csv:8: history: must hold JSON (a list), got text that is not "
                      f"(Expecting value: line 1 column 2 (char 1))",
                      f"{tmp_path}/bad.csv:9: 3 cells, but the header names 5 columns"]
    assert [c.line for c in result.conversations] == [2, 4, 7]   # the second row spans lines 4-6


def test_parquet_and_arrow_tables(tmp_path, index_tok, index_dir):
    """Nested columns (messages as a list of structs) read as they are; rows numbered from 1."""
    bad = {"messages": [{"role": "assistant", "content": "先答"}, {"role": "user", "content": "后问"}]}
    table = pa.Table.from_pylist(MESSAGES + [bad])
    pq.write_table(table, tmp_path / "t.parquet")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)   # a stream, as datasets writes its .arrow files
    with pa.OSFile(str(tmp_path / "t.feather"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    want = messages_of(read_source(write(tmp_path, "t.jsonl", jsonl(*MESSAGES))))
    for name in ("t.parquet", "t.arrow", "t.feather"):
        result = read_source(tmp_path / name)
        assert messages_of(result) == want, name
        assert [str(e) for e in result.errors] == [
            f"{tmp_path}/{name}: row 3: messages[0]: expected a user turn here, got assistant (turns must be "
            f"[system], then user and assistant alternating)"]
    with pytest.raises(UserError, match="bad row"):
        build(tmp_path / "t.parquet", index_tok, index_dir)


def test_a_folder_of_files(tmp_path, index_tok, index_dir):
    """Every data file below a folder, in path order; each example's source names its own file and
    line or row; a changed file re-tokenizes."""
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder, "a.jsonl", jsonl(*ROWS[:2]))
    (folder / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist(MESSAGES), folder / "sub" / "b.parquet")
    (folder / ".hidden").mkdir()
    write(folder / ".hidden", "c.jsonl", "not json\n")
    write(folder, "notes.txt", "not data")
    ds = build(folder, index_tok, index_dir)
    assert len(ds.train) == 4 and ds.report["file"] == str(folder)
    out = tmp_path / "dump.jsonl"
    dump_examples(out, ds)
    sources = [json.loads(line)["source"] for line in out.read_text().splitlines()]
    assert sources == [f"{folder}/a.jsonl:1", f"{folder}/a.jsonl:2", f"{folder}/sub/b.parquet: row 1",
                       f"{folder}/sub/b.parquet: row 2"]
    write(folder, "a.jsonl", jsonl(*ROWS))
    assert len(build(folder, index_tok, index_dir).train) == 5
    write(folder, "z.csv", "instruction,output\nq,\n")
    with pytest.raises(UserError, match=f"{folder}/z.csv:2: output: is empty"):
        build(folder, index_tok, index_dir)


def hub_copy(name, splits):
    """A hub dataset as `chatlora download --dataset` leaves it: parquet files per split."""
    folder = dataset_dir(name)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def test_hub_datasets_from_the_cache(index_tok, index_dir):
    hub_copy("someone/tiny", {"train": [ROWS[0], {"instruction": "再说一遍？", "output": "好。"}], "test": [ROWS[0]]})
    assert messages_of(read_source("hf:someone/tiny")) == messages_of(read_source("hf:someone/tiny:train"))
    assert len(read_source("hf:someone/tiny:train").conversations) == 2
    test = read_source("hf:someone/tiny:test")
    assert len(test.conversations) == 1 and test.conversations[0].messages[0]["content"] == "你是谁？"
    assert build("hf:someone/tiny", index_tok, index_dir).report["file"] == "hf:someone/tiny"
    with pytest.raises(UserError, match="Unknown split.*validation.*train"):
        read_source("hf:someone/tiny:validation")
    with pytest.raises(UserError, match="not in the cache.*chatlora download --dataset someone/absent"):
        read_source("hf:someone/absent")
    with pytest.raises(UserError, match="hf:OWNER/NAME"):
        read_source("hf:no-owner")
    hub_copy("someone/bad", {"train": [{"instruction": "q"}]})
    assert [str(e) for e in read_source("hf:someone/bad").errors] == ["hf:someone/bad: row 1: output: missing"]


def test_download_dataset_fetches_no_code(monkeypatch):
    import huggingface_hub

    from chatlora.models import hub

    calls = {}

    def snapshot_download(repo_id, repo_type=None, revision=None, local_dir=None, ignore_patterns=()):
        calls.update(repo_id=repo_id, repo_type=repo_type, ignore=list(ignore_patterns))
        local_dir.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.download_dataset("someone/fetched") == dataset_dir("someone/fetched")
    assert calls == {"repo_id": "someone/fetched", "repo_type": "dataset", "ignore": ["*.py"]}
