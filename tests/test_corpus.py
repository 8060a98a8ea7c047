"""Corpus preparation: inputs, stable ids, empty documents, the split rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_models import corpus_texts, tok_bytelevel, tok_metaspace, write_jsonl  # noqa: F401 (fixtures)
from fusellm_kernels.pipeline.corpus import (
    CorpusError,
    PrepareConfig,
    load_corpus,
    prepare_corpus,
    split_text,
    text_hash,
)


def prep(tmp_path: Path, *inputs: Path | str, name: str = "out", **kw) -> Path:
    out = tmp_path / name
    prepare_corpus(PrepareConfig(inputs=tuple(str(i) for i in inputs), output=str(out), progress=False, **kw))
    return out


def test_jsonl_parquet_text_and_saved_dataset_inputs(tmp_path: Path) -> None:
    import datasets

    texts = corpus_texts(6)
    write_jsonl(tmp_path / "a.jsonl", texts[:3], field="body")
    datasets.Dataset.from_dict({"body": texts[3:5]}).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "c.txt").write_text(texts[5], encoding="utf-8")
    out = prep(tmp_path, tmp_path / "a.jsonl", tmp_path / "b.parquet", tmp_path / "c.txt", text_field="body")
    ds, info = load_corpus(out)
    assert list(ds["text"]) == texts
    assert list(ds["doc_id"]) == list(range(6))
    assert list(ds["text_hash"]) == [text_hash(t) for t in texts]
    assert list(ds["source_index"]) == [0, 1, 2, 0, 1, 0]
    assert info.num_documents == 6 and info.text_bytes == sum(len(t.encode()) for t in texts)
    # a saved dataset (with splits) is an input too, and the ids and fingerprint are reproducible
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(str(tmp_path / "saved"))
    ds2, info2 = load_corpus(prep(tmp_path, tmp_path / "saved", name="out2", text_field="body", split="train"))
    assert list(ds2["text"]) == texts and info2.fingerprint == info.fingerprint
    assert not list((tmp_path / "saved").glob("**/cache-*"))  # the user's dataset is left untouched


def test_txt_units_and_directories(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.txt").write_text("line one\nline two\n\nline three\n")
    (d / "a.md").write_text("first para\n\nsecond para")
    ds, _ = load_corpus(prep(tmp_path, d, txt_unit="line"))
    assert list(ds["text"]) == ["first para", "second para", "line one", "line two", "line three"]
    ds, _ = load_corpus(prep(tmp_path, d, name="p", txt_unit="paragraph"))
    assert list(ds["text"]) == ["first para", "second para", "line one\nline two", "line three\n"]


def test_empty_and_whitespace_documents_are_dropped_or_kept(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "e.jsonl", ["a b", "", "  \n\t", "c"])
    ds, _ = load_corpus(prep(tmp_path, src))
    assert list(ds["text"]) == ["a b", "c"] and list(ds["source_index"]) == [0, 3] and list(ds["doc_id"]) == [0, 1]
    ds, _ = load_corpus(prep(tmp_path, src, name="keep", keep_empty=True))
    assert list(ds["text"]) == ["a b", "", "  \n\t", "c"]
    with pytest.raises(CorpusError, match="no documents"):
        prep(tmp_path, write_jsonl(tmp_path / "none.jsonl", ["", " "]), name="none")
    assert not (tmp_path / "none").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_bad_inputs_name_the_option(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "x.jsonl", ["a"])
    with pytest.raises(CorpusError, match="--text-field"):
        prep(tmp_path, src, text_field="content")
    with pytest.raises(CorpusError, match="does not exist"):
        prep(tmp_path, tmp_path / "missing.jsonl", name="m")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CorpusError, match="unknown file type"):
        prep(tmp_path, tmp_path / "x.csv", name="c")
    prep(tmp_path, src, name="once")
    with pytest.raises(CorpusError, match="--overwrite"):
        prep(tmp_path, src, name="once")
    prep(tmp_path, src, name="once", overwrite=True)
    with pytest.raises(CorpusError, match="fusellm prepare"):
        load_corpus(tmp_path)
    with pytest.raises(CorpusError, match="--split-tokenizers"):
        prep(tmp_path, src, name="t", split_tokenizers=(str(tmp_path / "no_tokenizer"),))


def _n(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_split_rule_budget_and_exact_pieces(tok_bytelevel, tok_metaspace) -> None:  # noqa: F811
    text = " ".join(corpus_texts(30, seed=4))
    toks = [tok_bytelevel, tok_metaspace]
    counts = [_n(t, text) for t in toks]
    budget = max(counts) // 4
    pieces = split_text(text, toks, budget)
    assert "".join(pieces) == text
    assert len(pieces) >= 4
    for p in pieces:
        assert all(_n(t, p) <= budget for t in toks)
    # cut points are token ends of the tokenizer that yields the most tokens
    big = toks[counts.index(max(counts))]
    ends = {e for _, e in big(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
    cut = len(pieces[0])
    assert cut in ends
    assert split_text("short text", toks, 1000) == ["short text"]


def test_prepare_with_split_tokenizers(tmp_path: Path, tok_bytelevel, tok_metaspace) -> None:  # noqa: F811
    tok_bytelevel.save_pretrained(tmp_path / "tb")
    tok_metaspace.save_pretrained(tmp_path / "tm")
    texts = corpus_texts(5)
    texts[2] = " ".join(corpus_texts(20, seed=9))
    src = write_jsonl(tmp_path / "s.jsonl", texts)
    out = prep(tmp_path, src, split_tokenizers=(str(tmp_path / "tb"), str(tmp_path / "tm")), max_tokens=64)
    ds, info = load_corpus(out)
    assert list(ds["doc_id"]) == list(range(len(ds)))
    pieces = [t for t, s in zip(list(ds["text"]), list(ds["source_index"])) if s == 2]
    assert len(pieces) > 1 and "".join(pieces) == texts[2]
    assert [c for c, s in zip(list(ds["chunk"]), list(ds["source_index"])) if s == 2] == list(range(len(pieces)))
    for t in list(ds["text"]):
        assert _n(tok_bytelevel, t) <= 64 and _n(tok_metaspace, t) <= 64
    m = json.loads((out / "fusellm_corpus.json").read_text())
    assert m["extra_split_pieces"] == len(ds) - len(texts) and m["settings"]["max_tokens"] == 64


def test_cli_prepare_help_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusellm_kernels.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--output", "--text-field", "--split-tokenizers", "--max-tokens", "--keep-empty", "--summary-json"):
        assert opt in help_text
    src = write_jsonl(tmp_path / "c.jsonl", ["one doc", "two doc", " "])
    assert main(["prepare", str(src), "--output", str(tmp_path / "o"), "--no-progress",
                 "--summary-json", str(tmp_path / "s.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "documents" in out
    assert [line.split()[-1] for line in out.splitlines() if "dropped empty/whitespace" in line] == ["1"]
    summary = json.loads((tmp_path / "s.jsonl").read_text())
    assert summary["stage"] == "prepare" and summary["documents"] == 2
    assert main(["prepare", str(src), "--output", str(tmp_path / "o")]) == 2  # exists: a clear error, no traceback
    assert "--overwrite" in capsys.readouterr().err


# --- bad input records: refused with the file and line named, or counted skips --------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from fusellm_kernels.cli import main

    rc = main(["prepare", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _no_leftovers(tmp_path: Path) -> None:
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_empty_file_and_invalid_utf8_name_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    rc, _, err = _cli(capsys, str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o1"))
    assert rc == 2 and "empty.jsonl" in err and "no records" in err and "Traceback" not in err
    (tmp_path / "bad.txt").write_bytes(b"fine\nnot \xff fine\n")
    rc, _, err = _cli(capsys, str(tmp_path / "bad.txt"), "--txt-unit", "line", "--output", str(tmp_path / "o2"))
    assert rc == 2 and "bad.txt:2: invalid UTF-8" in err and "--skip-bad-records" in err
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n\n{"text": "b\xe9"}\n')
    rc, _, err = _cli(capsys, str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o3"))
    assert rc == 2 and "bad.jsonl:3: invalid UTF-8" in err
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    rc, _, err = _cli(capsys, str(tmp_path / "broken.jsonl"), "--output", str(tmp_path / "o4"))
    assert rc == 2 and "broken.jsonl:2: not valid JSON" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    _no_leftovers(tmp_path)


def test_non_string_text_is_an_error_or_a_counted_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datasets

    src = tmp_path / "mixed.jsonl"
    src.write_text('{"text": "one"}\n{"text": 123}\n{"text": null}\n{"text": "two"}\n')
    rc, _, err = _cli(capsys, str(src), "--output", str(tmp_path / "o"))
    assert rc == 2 and "mixed.jsonl:2: 'text' is int 123, not a string" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "lines.txt").write_bytes(b"good\nbad \xff\n")
    datasets.Dataset.from_dict({"text": ["p", None]}).to_parquet(str(tmp_path / "n.parquet"))
    rc, out, err = _cli(capsys, str(src), str(tmp_path / "lines.txt"), str(tmp_path / "n.parquet"), "--txt-unit", "line",
                        "--skip-bad-records", "--output", str(tmp_path / "o"))
    assert rc == 0, err
    assert "skipped bad records          4 (first: " in out and "mixed.jsonl:2" in out
    ds, _ = load_corpus(tmp_path / "o")
    assert list(ds["text"]) == ["one", "two", "good", "p"] and list(ds["source_index"]) == [0, 3, 0, 0]
    m = json.loads((tmp_path / "o" / "fusellm_corpus.json").read_text())
    assert m["skipped_bad_records"] == 4 and m["source_rows"] == 8 and m["settings"]["skip_bad_records"]
    rc, _, err = _cli(capsys, str(tmp_path / "n.parquet"), "--output", str(tmp_path / "o5"))
    assert rc == 2 and "n.parquet (row 1): 'text' is null" in err


def test_a_failed_prepare_leaves_the_old_corpus_and_overwrites_only_a_corpus(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", ["a b", "c"])
    out = prep(tmp_path, good)
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"text": 5}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        prep(tmp_path, tmp_path / "bad.jsonl", overwrite=True)
    ds, info = load_corpus(out)  # still the complete old corpus, not a half-replaced one
    assert list(ds["text"]) == ["a b", "c"] and info.num_documents == 2
    _no_leftovers(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("not a corpus")
    with pytest.raises(CorpusError, match="is not a prepared corpus"):
        prep(tmp_path, good, name="data", overwrite=True)
    assert (tmp_path / "data" / "mine.txt").exists()
