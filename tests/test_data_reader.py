"""The one record reader (tao_core.records) and the prompt loader on hostile input.

Property tests feed arbitrary bytes, arbitrary JSON lines and random chat structures to the prompt
loader and the run-artifact reader: every outcome is a result or a TaoInputError naming the file
(and the line when a row is at fault); any other exception fails. Then one regression test per
input that used to escape as a raw exception or defeat ``on_error="skip"``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tao_core.data import load_prompts, load_prompts_report
from tao_core.errors import TaoInputError
from tao_core.records import MAX_DEPTH, read_json_object, read_records
from tao_core.rundir import RunDir
from tao_core.types import Candidate, Prompt, Score, read_jsonl

PROPERTY = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- strategies --------------------------------------------------------------------------------

FRAGMENTS = [b"\n", b"\r\n", b"\r", b",", b"\t", b'"', b'""', b"{", b"}", b"[", b"]", b":", b'"text"', b'"messages"',
             b'"role"', b'"user"', b'"content"', b"null", b"1e999", b"\\ud800", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00",
             "é".encode(), b"\xc3", b"\xe9", b"\xf0\x9f\x98", b'{"text": "a"}\n', b"text\n", b"prompt,id\n",
             b"text,extra\n", b'{"a":' * 3, b"[" * (MAX_DEPTH + 1)]
raw_files = st.lists(st.one_of(st.binary(max_size=16), st.sampled_from(FRAGMENTS)), max_size=24).map(b"".join)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
KEYS = st.one_of(st.sampled_from(["id", "text", "prompt", "question", "input", "messages", "task", "metadata",
                                  "role", "content"]), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(KEYS, inner, max_size=4)),
                           max_leaves=12)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]),
                           "content": st.one_of(st.text(max_size=8), json_values)}),
    st.dictionaries(KEYS, json_values, max_size=3),
    json_values,
), max_size=3)
prompt_rows = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(messages, json_values)},
                          optional={"id": json_values, "task": json_values, "metadata": json_values}),
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=10), json_values)}, optional={"id": json_values}),
    json_values,
)


def _assert_names_file(err: TaoInputError, path: Path, on_error: str) -> None:
    """The error starts with the file; under "skip" it is a file-level one, never a single bad row."""
    msg = str(err)
    assert msg.startswith(str(path)), msg
    if on_error == "skip":
        file_level = re.match(rf"{re.escape(str(path))}(: |:\d+: (cannot read the header row|duplicate column))", msg)
        assert file_level, f"a bad row was raised under on_error='skip': {msg}"


# -- properties --------------------------------------------------------------------------------

@PROPERTY
@given(data=raw_files, suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]), on_error=st.sampled_from(["raise", "skip"]))
def test_arbitrary_bytes_give_prompts_or_a_named_error(tmp_path, data, suffix, on_error):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(data)
    try:
        report = load_prompts_report(path, on_error=on_error)
    except TaoInputError as e:
        _assert_names_file(e, path, on_error)
    else:
        assert report.prompts and all(isinstance(p, Prompt) for p in report.prompts)
        assert on_error == "skip" or not report.skipped


@PROPERTY
@given(rows=st.lists(prompt_rows, min_size=1, max_size=6), on_error=st.sampled_from(["raise", "skip"]))
def test_arbitrary_json_lines_are_prompts_or_counted_bad_rows(tmp_path, rows, on_error):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        report = load_prompts_report(path, on_error=on_error)
    except TaoInputError as e:
        _assert_names_file(e, path, on_error)
        if on_error == "raise":
            assert re.match(rf"{re.escape(str(path))}:[1-{len(rows)}]: ", str(e)), str(e)
        else:
            assert f"no usable prompts ({len(rows)} bad rows" in str(e)
    else:
        assert len(report.prompts) + len(report.skipped) == len(rows)
        assert all(isinstance(m["content"], str) for p in report.prompts for m in p.as_messages())


@PROPERTY
@given(header=st.lists(st.sampled_from(["text", "prompt", "id", "messages", "task", "x"]), min_size=1, max_size=4,
                       unique=True),
       rows=st.lists(st.lists(st.text(max_size=10), min_size=1, max_size=5), min_size=1, max_size=6),
       delimiter=st.sampled_from([",", "\t"]), on_error=st.sampled_from(["raise", "skip"]))
def test_csv_rows_are_prompts_or_counted_bad_rows(tmp_path, header, rows, delimiter, on_error):
    """Random cells (quotes, line breaks, NUL, non-ASCII), and rows with too few or too many fields."""
    path = tmp_path / ("prompts.csv" if delimiter == "," else "prompts.tsv")
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerows([header, *rows])
    path.write_text(out.getvalue(), encoding="utf-8")
    try:
        report = load_prompts_report(path, on_error=on_error)
    except TaoInputError as e:
        _assert_names_file(e, path, on_error)
        if on_error == "skip":
            assert f"no usable prompts ({len(rows)} bad rows" in str(e)
    else:
        assert len(report.prompts) + len(report.skipped) == len(rows)
        assert on_error == "skip" or not report.skipped


@PROPERTY
@given(rows=st.lists(st.dictionaries(KEYS | st.sampled_from(["prompt_id", "index", "token_ids", "logprobs", "status",
                                                             "value", "reason", "prompt_token_ids"]),
                                     json_values, max_size=8), min_size=1, max_size=4),
       cls=st.sampled_from([Prompt, Candidate, Score]))
def test_run_artifacts_read_or_fail_at_their_line(tmp_path, rows, cls):
    path = tmp_path / "artifacts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        assert len(read_jsonl(path, cls)) == len(rows)
    except TaoInputError as e:
        assert re.match(rf"{re.escape(str(path))}:\d+: ", str(e)), str(e)


# -- regressions: each input that used to escape as a raw exception ---------------------------------

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GOOD = b'{"id": "ok", "text": "What is 2 + 2?"}\n'


@pytest.mark.parametrize(("name", "bad_line", "reason"), [
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"not valid UTF-8 \(byte 0xe9 at column 14\); save the file as UTF-8"),
    ("deep.jsonl", b'{"text": "x", "m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     rf"JSON nested deeper than {MAX_DEPTH} levels"),
    ("content_number.jsonl", b'{"messages": [{"role": "user", "content": 5}]}\n', r"'content' must be a string, got 5"),
    ("content_null.jsonl", b'{"messages": [{"role": "user", "content": null}]}\n',
     r"'content' must be a string, got None"),
    ("role.jsonl", b'{"messages": [{"role": "robot", "content": "hi"}]}\n', r"'role' must be one of"),
    ("empty_text.jsonl", b'{"text": "  "}\n', r"'text' is empty"),
    ("array.jsonl", b"[1, 2]\n", r"expected a JSON object, got list"),
    ("bigint.jsonl", b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n", r"an integer has more than \d+ digits"),
    ("surrogate.jsonl", b'{"text": "\\udc00"}\n', r"unpaired UTF-16 surrogate"),
    ("extra_field.csv", b"a,b,c\n", r"3 field\(s\), but the header \(line 1\) names 2; quote a field that contains ','"),
    ("missing_field.csv", b"a\n", r"1 field\(s\), but the header \(line 1\) names 2; give every column a value"),
    ("latin1.csv", b"caf\xe9,x\n", r"not valid UTF-8"),
    ("open_quote.csv", b'"never closed,x\n', r"a quoted field is never closed"),
    ("messages_cell.csv", b'"[{""role"": ""user"", ""content"": null}]",x\n', r"'content' must be a string"),
])
def test_each_bad_row_names_its_line_and_is_skipped(tmp_path, name, bad_line, reason):
    head = b"text,id\nfine,ok\n" if name.endswith(".csv") else GOOD
    if name == "messages_cell.csv":
        head = b"messages,id\n" + b'"[{""role"": ""user"", ""content"": ""hi""}]",ok\n'
    path = _write(tmp_path / name, head + bad_line + head.splitlines(keepends=True)[-1].replace(b"ok", b"ok2"))
    line = head.count(b"\n") + 1
    with pytest.raises(TaoInputError, match=rf"^{re.escape(str(path))}:{line}: .*{reason}"):
        load_prompts(path)
    report = load_prompts_report(path, on_error="skip")
    # an unclosed quote runs to the end of the file, taking the row after it along
    assert [p.id for p in report.prompts] == (["ok"] if name == "open_quote.csv" else ["ok", "ok2"])
    assert [ln for ln, _ in report.skipped] == [line] and re.search(reason, report.skipped[0][1])


def test_long_csv_field_reads_and_the_limit_is_ours(tmp_path):
    """A 200 KB field (over csv's 128 KB default) reads; over max_line_bytes it is a named bad row."""
    path = _write(tmp_path / "big.csv", b'text\n"' + b"x" * 200_000 + b'"\nshort\n')
    assert [len(p.text) for p in load_prompts(path, max_chars=None)] == [200_000, 5]
    path = _write(tmp_path / "big.csv", b'text\n"' + b"x\n" * 600 + b'"\nshort\n')
    records = read_records(path, on_error="skip", max_line_bytes=1000)
    assert [(line, row["text"]) for line, row in records] == [(603, "short")]
    assert records.skipped == [(2, "a field is longer than 1000 characters (the max_line_bytes limit); "
                                   "shorten it or raise the limit")]


def test_long_line_is_not_read_whole_and_the_next_line_is(tmp_path):
    path = _write(tmp_path / "long.jsonl", b'{"text": "' + b"x" * 5000 + b'"}\n' + GOOD)
    records = read_records(path, on_error="skip", max_line_bytes=100)
    assert [line for line, _ in records] == [2]
    assert records.skipped == [(1, "line is longer than 100 bytes (the max_line_bytes limit); split the record "
                                   "or raise the limit")]


@pytest.mark.parametrize(("data", "message"), [
    (b"", "the file holds no rows"),
    (b"\n\n  \n", "the file holds no rows"),
    (b"text,id\n", "the file holds no rows"),
    ('{"text": "hi"}\n'.encode("utf-16"), "the file is UTF-16 or UTF-32"),
    (b"text,text\na,b\n", "1: duplicate column name(s) ['text'] in the header"),
    (b"te\xffxt\nhi\n", "1: cannot read the header row: not valid UTF-8"),
    (b'{"text": 1}\n[]\n', "no usable prompts (2 bad rows, the first at line 1: column 'text' must hold text, got int)"),
])
def test_file_level_problems_raise_even_when_skipping(tmp_path, data, message):
    suffix = ".csv" if data.startswith((b"text", b"te\xff")) else ".jsonl"
    path = _write(tmp_path / f"p{suffix}", data)
    with pytest.raises(TaoInputError, match=re.escape(f"{path}:" if message[0].isdigit() else f"{path}: ")) as e:
        load_prompts_report(path, on_error="skip")
    assert message in str(e.value)


def test_file_errors_and_unsupported_types(tmp_path):
    with pytest.raises(TaoInputError, match=r"missing.jsonl: file not found"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(TaoInputError, match=r"unsupported file type '.txt'; use .jsonl, .csv, .tsv or .parquet"):
        read_records(_write(tmp_path / "p.txt", GOOD))
    with pytest.raises(TaoInputError, match=r"on_error must be 'raise' or 'skip'"):
        read_records(_write(tmp_path / "p.jsonl", GOOD), on_error="ignore")  # type: ignore[arg-type]


def test_bom_nul_crlf_and_missing_final_newline_are_fine(tmp_path):
    assert load_prompts(_write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + GOOD))[0].id == "ok"
    assert [p.text for p in load_prompts(_write(tmp_path / "bom.csv", b"\xef\xbb\xbftext\r\nhi\r\n"))] == ["hi"]
    assert [p.text for p in load_prompts(_write(tmp_path / "nul.csv", b"text\na\x00b\n"))] == ["a\x00b"]
    assert [p.text for p in load_prompts(_write(tmp_path / "q.csv", b'text\n"two\nlines"\nnext'))] == ["two\nlines", "next"]
    assert load_prompts(_write(tmp_path / "tail.jsonl", GOOD.rstrip(b"\n")))[0].id == "ok"


def test_parquet_bad_values_and_bad_files(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "when": [None, datetime.date(2024, 1, 2)],
                             "blob": [None, b"\x00\x01"]}), path)
    report = load_prompts_report(path, on_error="skip")
    assert [p.text for p in report.prompts] == ["a"]
    assert report.skipped == [(2, "column(s) 'blob' (bytes) hold values JSON cannot store; cast them to strings")]
    stamped = tmp_path / "t.parquet"  # typed timestamps (an AI Gateway export) read as ISO 8601 text
    pq.write_table(pa.table({"prompt": ["a"], "request_time": [datetime.datetime(2026, 5, 1, 12, 30)]}), stamped)
    from tao_core.records import read_records

    assert [row for _, row in read_records(stamped)] == [{"prompt": "a", "request_time": "2026-05-01T12:30:00"}]
    with pytest.raises(TaoInputError, match=r"not a readable Parquet file"):
        load_prompts(_write(tmp_path / "junk.parquet", b"PAR1 not really"))


def test_read_json_object_names_the_file(tmp_path):
    assert read_json_object(_write(tmp_path / "c.json", b'\xef\xbb\xbf{"a": 1}')) == {"a": 1}
    for data, reason in [(b"{oops", "invalid JSON"), (b"[1]", "expected a JSON object"), (b"\xff", "not valid UTF-8"),
                         (b"[" * 5000, "nested deeper")]:
        with pytest.raises(TaoInputError, match=rf"c.json: .*{reason}"):
            read_json_object(_write(tmp_path / "c.json", data))


# -- the metrics log: a torn tail is a kill mid-write, a torn middle is corruption -------------------

def _metrics(tmp_path: Path, tail: bytes) -> Path:
    rows = [{"type": "step", "step": 1, "generate_s": 1.0, "score_s": 0.5, "train_s": 2.0},
            {"type": "warning", "step": 1, "kind": "kl", "message": "KL grew — ünïcödé"}]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    RunDir(tmp_path / "run").claim("run").release()
    return _write(tmp_path / "run" / "metrics.jsonl", data + tail)


@pytest.mark.parametrize("tail", [
    '{"type": "warning", "message": "ü'.encode()[:-1],  # cut inside the two bytes of "ü"
    b'{"type": "step", "st',
    b"\xe2\x80",  # the first two bytes of a three-byte character
])
def test_torn_metrics_tail_is_dropped_and_report_works(tmp_path, tail):
    from tao_core.cli import cli

    _metrics(tmp_path, tail)
    records = RunDir(tmp_path / "run").read_metrics()
    assert [r["type"] for r in records] == ["step", "warning"]
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "ünïcödé" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_corrupt_metrics_line_in_the_middle_is_an_error(tmp_path):
    path = _metrics(tmp_path, b'{"type": "step", "st\xc3\n{"type": "final", "step": 1}\n')
    with pytest.raises(TaoInputError, match=rf"{re.escape(str(path))}:3: not valid UTF-8"):
        RunDir(tmp_path / "run").read_metrics()
