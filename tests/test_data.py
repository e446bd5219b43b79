"""Calibration data: loading every source offline, packing against a direct reference, errors."""

from __future__ import annotations

import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sglp_llm import data
from sglp_llm.config import ConfigError, SGLPConfig
from sglp_llm.data import (
    CalibrationError,
    CalibrationSet,
    build_batches,
    first_samples,
    first_tokens,
    load_texts,
    prepare_calibration,
)

# Every word distinct, so a window's ids say exactly where in the stream it was cut from.
DOCS = [" ".join(f"d{d}w{w}" for w in range(n)) for d, n in enumerate([13, 7, 21, 9, 17])]
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2}
VOCAB.update({w: i + 3 for i, w in enumerate(w for doc in DOCS for w in doc.split())})


def make_tokenizer(*, eos: bool = True, bos: bool = False, adds_bos: bool = False):
    """A word-level tokenizer over DOCS; `adds_bos` makes it prepend <s> like LLaMA's."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])]
        )
    special = {"unk_token": "<unk>"}
    if eos:
        special["eos_token"] = "</s>"
    if bos:
        special["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special)


def reference_windows(seq_len: int, *, sep: list[int], prefix: list[int]) -> list[list[int]]:
    """All packed windows, computed from the vocabulary without the tokenizer."""
    stream: list[int] = []
    for i, doc in enumerate(DOCS):
        stream += (sep if i else []) + [VOCAB[w] for w in doc.split()]
    body = seq_len - len(prefix)
    return [prefix + stream[i * body : (i + 1) * body] for i in range(len(stream) // body)]


def rows(cal: CalibrationSet) -> list[list[int]]:
    return [row for batch in cal for row in batch["input_ids"].tolist()]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """No Hub access and no cache writes outside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


# ---------------------------------------------------------------------------------- packing
@pytest.mark.parametrize(
    "kwargs, sep, prefix",
    [
        ({}, [2], []),  # eos only (Qwen-style)
        ({"bos": True}, [2], []),  # has bos but does not add it (GPT-2-style)
        ({"bos": True, "adds_bos": True}, [2], [1]),  # adds bos (LLaMA-style)
        ({"eos": False}, [], []),  # no eos: documents are simply concatenated
    ],
)
def test_windows_equal_reference_packing(kwargs, sep, prefix):
    ref = reference_windows(10, sep=sep, prefix=prefix)
    cal = build_batches(
        make_tokenizer(**kwargs), DOCS, seq_len=10, n_samples=len(ref), batch_size=2, seed=3
    )
    assert sorted(rows(cal)) == sorted(ref)
    assert [b["input_ids"].shape[0] for b in cal] == [2] * (len(ref) // 2) + [1] * (len(ref) % 2)
    assert len(cal) == len(cal.batches) == -(-len(ref) // 2)
    for batch in cal:
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
        assert batch["attention_mask"].eq(1).all()
    assert (cal.n_tokens, cal.n_samples, cal.seq_len) == (10 * len(ref), len(ref), 10)


def test_selection_is_seeded_and_a_subset_of_the_windows():
    tok = make_tokenizer()
    ref = reference_windows(6, sep=[2], prefix=[])

    def pick(seed):
        return rows(build_batches(tok, DOCS, seq_len=6, n_samples=5, batch_size=2, seed=seed))

    first = pick(0)
    assert len(first) == 5 and len({tuple(r) for r in first}) == 5
    assert all(r in ref for r in first)
    assert pick(0) == first
    assert pick(1) != first


def test_fewer_windows_than_requested_uses_all_and_warns():
    ref = reference_windows(20, sep=[2], prefix=[])
    with pytest.warns(UserWarning, match=rf"71 tokens: only {len(ref)} windows .* using all"):
        cal = build_batches(make_tokenizer(), DOCS, seq_len=20, n_samples=50, batch_size=4, seed=0)
    assert sorted(rows(cal)) == sorted(ref)
    assert cal.n_samples == len(ref) == 3


def test_build_batches_errors():
    tok = make_tokenizer()
    with pytest.raises(
        CalibrationError, match=r"only 71 tokens, fewer than seq_len=72; .*--seq-len"
    ):
        build_batches(tok, DOCS, seq_len=72, n_samples=1, batch_size=1, seed=0)
    with pytest.raises(
        CalibrationError, match=r"seq_len=64 .* max_position_embeddings=32; use --seq-len 32"
    ):
        build_batches(tok, DOCS, seq_len=64, n_samples=1, batch_size=1, seed=0, max_positions=32)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        build_batches(None, DOCS, seq_len=8, n_samples=1, batch_size=1, seed=0)


# ---------------------------------------------------------------------------------- loading
def test_txt_file_is_one_text(tmp_path, offline_datasets):
    path = tmp_path / "a.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n")
    texts, source = load_texts(str(path))
    assert texts == [path.read_text()]
    assert source == f"1 texts from 1 local file(s) at {str(path)!r}"
    assert not offline_datasets.exists()  # local files never go to the HF cache


def test_jsonl_json_csv_parquet_rows(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    records = [{"text": "j1", "n": 1}, {"text": "  "}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_json = tmp_path / "b.json"
    as_json.write_text(json.dumps([{"body": "x1"}, {"body": "x2"}]))
    csv = tmp_path / "c.csv"
    csv.write_text('text,n\n"c,1",1\n,2\nc3,3\n')
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), parquet)

    assert load_texts(str(jsonl))[0] == ["j1"]
    assert load_texts(str(as_json), text_column="body")[0] == ["x1", "x2"]
    assert load_texts(str(csv))[0] == ["c,1", "c3"]
    assert load_texts(str(parquet))[0] == ["p1", "p2"]


def test_directory_loads_supported_files_recursively_in_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("text b")
    (root / "sub" / "a.txt").write_text("text sub/a")
    (root / "a.jsonl").write_text('{"text": "row 1"}\n{"text": "row 2"}\n')
    (root / "notes.md").write_text("not calibration data")
    (root / ".hidden" / "x.txt").write_text("skipped")
    (root / ".y.txt").write_text("skipped")
    texts, source = load_texts(str(root))
    # Grouped by reader in order of first appearance among the sorted files.
    assert texts == ["row 1", "row 2", "text b", "text sub/a"]
    assert source == f"4 texts from 3 local file(s) at {str(root)!r}"


def test_default_text_is_long_and_deterministic():
    texts, source = load_texts(None)
    assert source.startswith("built-in default: docstrings of 54 Python ")
    assert all(len(t) >= 200 for t in texts) and len(set(texts)) == len(texts)
    assert sum(len(t.split()) for t in texts) >= 64 * 512  # words <= tokens for subword vocabs
    assert "Command-line parsing library" in texts[0]  # argparse's module docstring comes first
    assert load_texts(None) == (texts, source)


def test_default_text_skips_missing_modules(monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_MODULES", ("no_such_module_sglp", "json"))
    texts, source = load_texts(None)
    assert "docstrings of 1 Python" in source
    assert texts[0].startswith("JSON (JavaScript Object Notation)")


def test_builtin_stdlib_docs_is_the_default_text():
    assert load_texts("builtin:stdlib-docs") == load_texts(None)


@pytest.fixture
def fortunes_dir(tmp_path, monkeypatch):
    """A fake /usr/share/games/fortunes: two categories, their strfile indexes and UTF-8 links,
    the offensive off/ folder, an overstruck word, a blank entry and a % inside a line."""
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    (root / "people").write_text("Ann said:\n\n  \"Hello.\"\n%\nBob.\n%\n\n%\nCyd is 100% sure.\n%\n")
    (root / "art").write_text("A _\x08b_\x08o_\x08l_\x08d word, B\x08Bo\x08ol\x08ld, ___\x08\x08\x08too.\n%\n\x08Paint.\n")
    (root / "art.dat").write_bytes(b"\x00\x00\x00\x02%\n")
    (root / "art.u8").symlink_to(root / "art")
    (root / "off" / "rude").write_text("Not included.\n%\n")
    monkeypatch.setattr(data, "FORTUNES_DIR", root)
    return root


def test_fortunes_entries_taken_in_turn_from_each_file(fortunes_dir):
    texts, source = load_texts("builtin:fortunes")
    # files in name order (art, people), one entry from each in turn
    assert texts == ["A bold word, Bold, too.", "Ann said:\n\n  \"Hello.\"", "Paint.", "Bob.", "Cyd is 100% sure."]
    assert source == f"built-in fortunes: 5 entries from 2 files in {fortunes_dir}"
    assert load_texts("builtin:fortunes") == (texts, source)


@pytest.mark.skipif(not data.FORTUNES_DIR.is_dir(), reason="Debian's fortunes package is not installed")
def test_installed_fortunes_are_many_plain_entries():
    texts, _ = load_texts("builtin:fortunes")
    assert len(texts) > 1000
    assert not any("\x08" in t or t.strip() == "%" or not t.strip() for t in texts)


@pytest.mark.parametrize("make", [lambda root: None, lambda root: root.mkdir(), lambda root: (root / "off").mkdir(parents=True)])
def test_missing_fortunes_say_how_to_install(tmp_path, monkeypatch, make):
    root = tmp_path / "fortunes"
    make(root)
    monkeypatch.setattr(data, "FORTUNES_DIR", root)
    with pytest.raises(
        CalibrationError,
        match=rf"'builtin:fortunes' needs Debian's fortunes text in {re.escape(str(root))}, which is "
        r"missing or empty: install it with `apt-get install fortunes`, or give another dataset\.",
    ):
        load_texts("builtin:fortunes")


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(
        CalibrationError,
        match=r"Unknown built-in text 'builtin:wiki'; the built-in texts are 'builtin:stdlib-docs', "
        r"'builtin:python-reference', 'builtin:fortunes' and 'builtin:licenses', and 'builtin:self-generated' "
        r"samples the model\.",
    ):
        load_texts("builtin:wiki")


def test_loading_errors(tmp_path, monkeypatch):
    bad = tmp_path / "notes.md"
    bad.write_text("x")
    with pytest.raises(
        CalibrationError, match=r"notes.md' is not a supported calibration file; use one of .txt"
    ):
        load_texts(str(bad))
    with pytest.raises(
        CalibrationError, match=r"holds no calibration files of a supported type \(.txt"
    ):
        load_texts(str(tmp_path))
    with pytest.raises(
        CalibrationError, match=r"Calibration path '\./missing.jsonl' does not exist"
    ):
        load_texts("./missing.jsonl")
    rows_file = tmp_path / "r.jsonl"
    rows_file.write_text('{"content": "a", "id": 1}\n')
    with pytest.raises(
        CalibrationError,
        match=r"no column 'text'; its columns are \['content', 'id'\]\. .*--text-column",
    ):
        load_texts(str(rows_file))
    with pytest.raises(
        CalibrationError, match=r"no non-empty text; check the files or the --text-column"
    ):
        load_texts(str(rows_file), text_column="id")
    with pytest.raises(
        CalibrationError, match=r"Could not load the calibration data Hub dataset 'nobody/absent'"
    ):
        load_texts("nobody/absent", config_name="en", split="train[:10]")
    monkeypatch.setattr(data, "DEFAULT_MODULES", ())
    with pytest.raises(CalibrationError, match=r"built-in calibration text .* is empty.*-OO"):
        load_texts(None)
    assert issubclass(CalibrationError, ConfigError)  # the CLI reports both the same way


# ---------------------------------------------------------------------------------- prepare
CONFIG = SGLPConfig(drop=1, seq_len=6, n_samples=4, batch_size=3, seed=5)


def test_prepare_from_texts_path_and_config(tmp_path):
    tok = make_tokenizer()
    direct = build_batches(tok, DOCS, seq_len=6, n_samples=4, batch_size=3, seed=5)
    from_list = prepare_calibration(DOCS + ["   "], tok, CONFIG)
    assert rows(from_list) == rows(direct) and from_list.source == "texts given in Python"
    assert [b["input_ids"].shape[0] for b in from_list] == [3, 1]

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    config = CONFIG.replace(dataset="ignored/by-argument", text_column="body")
    from_path = prepare_calibration(str(path), tok, config)
    assert rows(from_path) == rows(direct) and "local file" in from_path.source
    from_config = prepare_calibration(None, tok, config.replace(dataset=str(path)))
    assert rows(from_config) == rows(direct)

    default = prepare_calibration(None, tok, CONFIG)
    assert default.source.startswith("built-in default") and default.n_samples == 4
    assert prepare_calibration(default, None, CONFIG) is default


def test_prepare_from_pretokenized_batches():
    ids = torch.arange(12, dtype=torch.int32).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    cal = prepare_calibration(
        [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :4]}], None, CONFIG
    )
    assert cal.batches[0]["input_ids"].dtype == torch.long
    assert torch.equal(cal.batches[0]["input_ids"], ids.long())
    assert torch.equal(cal.batches[1]["attention_mask"], torch.ones(1, 4, dtype=torch.long))
    assert (cal.n_tokens, cal.n_samples, cal.seq_len, len(cal)) == (14, 3, 6, 2)


def test_prepare_errors():
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(
        CalibrationError, match=r"batch 1: `input_ids` must be .* got shape \[6\], torch.int64"
    ):
        prepare_calibration([{"input_ids": ids}, {"input_ids": ids[0]}], None, CONFIG)
    with pytest.raises(CalibrationError, match=r"got shape \[2, 6\], torch.float32"):
        prepare_calibration([{"input_ids": ids.float()}], None, CONFIG)
    with pytest.raises(CalibrationError, match=r"batch 0: `input_ids` .* got list"):
        prepare_calibration([{"input_ids": [[1, 2]]}], None, CONFIG)
    with pytest.raises(
        CalibrationError, match=r"`attention_mask` must be .* \[2, 6\], got \[2, 5\]"
    ):
        prepare_calibration([{"input_ids": ids, "attention_mask": ids[:, :5]}], None, CONFIG)
    with pytest.raises(CalibrationError, match=r"`attention_mask` .* got list"):
        prepare_calibration([{"input_ids": ids, "attention_mask": [1]}], None, CONFIG)
    with pytest.raises(CalibrationError, match="max_position_embeddings=4; use --seq-len 4"):
        prepare_calibration([{"input_ids": ids}], None, CONFIG, max_positions=4)
    cal = prepare_calibration([{"input_ids": ids}], None, CONFIG)
    with pytest.raises(CalibrationError, match="max_position_embeddings=5"):
        prepare_calibration(cal, None, CONFIG, max_positions=5)
    with pytest.raises(CalibrationError, match="only texts .* or only pre-tokenized batches"):
        prepare_calibration(["text", {"input_ids": ids}], None, CONFIG)
    with pytest.raises(CalibrationError, match=r"got list \(empty\)\."):
        prepare_calibration([], None, CONFIG)
    with pytest.raises(CalibrationError, match=r"a non-empty list of texts .* got Tensor\."):
        prepare_calibration(ids, None, CONFIG)
    with pytest.raises(CalibrationError, match=r"\(texts given in Python\) has no non-empty text"):
        prepare_calibration(["", " \n"], make_tokenizer(), CONFIG)


def test_first_samples_takes_the_first_sequences_across_batches():
    ids = torch.arange(5 * 3).reshape(5, 3)
    batches = [{"input_ids": part, "attention_mask": torch.ones_like(part)} for part in ids.split(2)]
    for n, rows in ((1, [[0, 1, 2]]), (3, [[0, 1, 2], [3, 4, 5], [6, 7, 8]]), (9, ids.tolist())):
        taken = first_samples(batches, n)
        assert torch.cat([b["input_ids"] for b in taken]).tolist() == rows
        assert all(b["attention_mask"].shape == b["input_ids"].shape for b in taken)


def test_first_tokens_takes_the_same_sequences_whatever_the_batch_size():
    ids = torch.arange(6 * 4).reshape(6, 4)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # the second sequence holds 2 tokens
    for n_tokens, rows in ((1, 1), (4, 1), (5, 2), (6, 2), (7, 3), (100, 6)):
        taken = [
            torch.cat([b["input_ids"] for b in first_tokens(
                [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(size), mask.split(size))], n_tokens)])
            for size in (1, 2, 4)
        ]
        assert all(t.tolist() == ids[:rows].tolist() for t in taken), (n_tokens, rows)


def test_loss_check_scores_the_same_tokens_whatever_the_batch_size():
    """`loss_tokens`, not a batch count: halving the batch size leaves the loss check's evidence,
    and so its losses and choice, unchanged."""
    from sglp_llm import SGLPConfig, analyze
    from tiny_models import tiny_batch, tiny_model

    model = tiny_model("llama", num_layers=6)
    windows = torch.cat([tiny_batch(batch_size=4, seq_len=16, seed=s)["input_ids"] for s in range(2)])
    plans = []
    for size in (4, 2):
        batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(size)]
        config = SGLPConfig(drop=2, loss_tokens=6 * 16, batch_size=size, cka_minibatch_tokens=16, verify=False)
        plans.append(analyze(model, batches, config, progress=False))
    first, second = (p.extra["loss_check"]["steps"] for p in plans)
    assert [s["block"] for s in first] == [s["block"] for s in second]
    assert [s["loss"] for s in first] == pytest.approx([s["loss"] for s in second], rel=1e-6)
    assert plans[0].dropped == plans[1].dropped


def test_licence_paragraphs_interleave_the_files(tmp_path, monkeypatch):
    import sglp_llm.data as data

    (tmp_path / "A").write_text("a" * 250 + "\n\nshort\n\n" + "b" * 300)
    (tmp_path / "B").write_text("c" * 220)
    (tmp_path / "C").symlink_to(tmp_path / "A")
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path)
    texts, description = load_texts("builtin:licenses")
    assert texts == ["a" * 250, "c" * 220, "b" * 300]
    assert "3 paragraphs from 2 files" in description
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "missing")
    with pytest.raises(data.CalibrationError, match="licence texts"):
        load_texts("builtin:licenses")


# ---------------------------------------------------------------------------------- mixed sources
def test_python_reference_is_language_prose_every_cpython_has():
    texts, description = load_texts(data.PYTHON_REFERENCE)
    assert len(texts) > 50 and sum(map(len, texts)) > 100_000 and "language reference" in description
    assert not set(texts) & set(load_texts(data.STDLIB_DOCS)[0])


def test_mixed_sources_share_the_windows_and_alternate(tmp_path):
    """Each source gives the windows it gives alone for its share of n_samples (the first source
    takes the remainder), and the set alternates them, so any first tokens hold both."""
    tok = make_tokenizer()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    second.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[3:]))
    config = CONFIG.replace(dataset=[str(first), str(second)], n_samples=5, batch_size=2, seq_len=4)
    mixed = prepare_calibration(None, tok, config)
    alone = [rows(build_batches(tok, texts, seq_len=4, n_samples=n, batch_size=1, seed=config.seed))
             for texts, n in ((DOCS[:3], 3), (DOCS[3:], 2))]
    assert rows(mixed) == [alone[0][0], alone[1][0], alone[0][1], alone[1][1], alone[0][2]]
    assert [b["input_ids"].shape[0] for b in mixed] == [2, 2, 1] and mixed.n_samples == 5 and mixed.n_tokens == 20
    assert "3 windows of" in mixed.source and ", alternating with 2 windows of" in mixed.source
    with pytest.raises(CalibrationError, match="n_samples=1 windows cannot be shared by 2 calibration sources"):
        prepare_calibration(None, tok, config.replace(n_samples=1))


def test_a_list_of_sources_is_a_setting_that_saves_and_keys_the_statistics(tmp_path):
    from sglp_llm.api import statistics_key

    config = SGLPConfig(drop=1, dataset=[data.STDLIB_DOCS, data.PYTHON_REFERENCE])
    config.save(tmp_path / "c.yaml")
    assert SGLPConfig.load(tmp_path / "c.yaml") == config
    assert hash(statistics_key(config, 1)) == hash(statistics_key(config.replace(), 1))
    assert statistics_key(config, 1) != statistics_key(config.replace(dataset=data.STDLIB_DOCS), 1)
    for bad in ([], [""], [data.STDLIB_DOCS, 3], 7):
        with pytest.raises(ConfigError, match="`dataset`"):
            SGLPConfig(drop=1, dataset=bad)
