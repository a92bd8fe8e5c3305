"""Text --inputs (.txt, .jsonl) tokenized with a Hugging Face model directory's own tokenizer: the batches are the
tokenizer's ids cut into BOS-led sequences, a large text is read only as far as --batches needs, and every problem
(not a model directory, no tokenizer, not UTF-8, a bad JSON line, too little text, --seq-len with saved inputs) is one
line and exit 2."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from fp8probe.analysis import loading  # noqa: E402
from fp8probe.analysis.loading import LoadError, load_inputs, load_text_inputs  # noqa: E402
from fp8probe.cli import cli  # noqa: E402

WORDS = "the a cat dog sat on mat ran far fast slow big small red blue green under over near".split()


def _tokenizer(bos: bool = True) -> transformers.PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([" ".join(WORDS)], trainer)
    extra = {"bos_token": "<s>"} if bos else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **extra)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   use_cache=False)
    d = tmp_path_factory.mktemp("text") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


def _copy_with(src: Path, dst: Path, json_file: str, **changes: object) -> Path:
    """A copy of the model directory ``src`` at ``dst`` with ``changes`` made to one of its JSON files."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    (dst / json_file).write_text(json.dumps({**json.loads((dst / json_file).read_text()), **changes}))
    return dst


def _story(path: Path, lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    text = ["  ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)]
    path.write_text("\n".join(text), encoding="utf-8")
    return text


def test_text_is_the_tokenizers_ids_in_bos_led_sequences_and_batches(llama_dir, tmp_path) -> None:
    lines = _story(tmp_path / "story.txt", 50)  # 500 words: 500 tokens
    batches, desc = load_text_inputs(tmp_path / "story.txt", llama_dir, seq_len=33, batch_size=3)
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    ids = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
    assert len(ids) == 500
    # 32 tokens after BOS per sequence: 15 sequences, 5 batches of 3, 20 tokens left
    assert len(batches) == 5 and all(list(b.kwargs) == ["input_ids"] for b in batches)
    rows = torch.cat([b.kwargs["input_ids"] for b in batches])
    assert rows.shape == (15, 33) and rows.dtype == torch.long
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert rows[:, 1:].reshape(-1).tolist() == ids[:15 * 32]
    assert desc == ("story.txt: 5 batch(es) of 3 x 33 tokens (500 tokens read with llama's tokenizer; the last 20 "
                    "unused; each sequence starts with BOS)")


def test_batches_read_the_text_only_as_far_as_they_need(llama_dir, tmp_path, monkeypatch) -> None:
    _story(tmp_path / "long.txt", 400)  # 4000 tokens
    monkeypatch.setattr(loading, "TEXT_CHUNK_CHARS", 200)  # ~4 lines a chunk
    read = []
    real = loading._text_chunks

    def counting(path):
        for chunk in real(path):
            read.append(chunk)
            yield chunk
    monkeypatch.setattr(loading, "_text_chunks", counting)
    batches, desc = load_text_inputs(tmp_path / "long.txt", llama_dir, seq_len=11, batch_size=2, max_batches=2)
    assert len(batches) == 2 and batches[0].kwargs["input_ids"].shape == (2, 11)
    assert sum(len(c.split()) for c in read) < 200  # 40 tokens needed: a few chunks of the 400 lines' 4000 words
    assert desc.startswith("long.txt: 2 batch(es) of 2 x 11 tokens (") and desc.endswith(
        " tokens read with llama's tokenizer, the rest of the text not; the last 31 unused; at most 2 batches: "
        "--batches for more; each sequence starts with BOS)")


def test_short_text_gives_one_shorter_batch_and_too_little_is_an_error(llama_dir, tmp_path) -> None:
    (tmp_path / "few.txt").write_text("the cat sat on the mat", encoding="utf-8")
    batches, desc = load_text_inputs(tmp_path / "few.txt", llama_dir, seq_len=4, batch_size=4)
    assert [b.kwargs["input_ids"].shape for b in batches] == [(2, 4)]  # 6 tokens: 2 sequences of BOS + 3, one batch
    assert "unused" not in desc
    (tmp_path / "one.txt").write_text("cat", encoding="utf-8")
    batches, _ = load_text_inputs(tmp_path / "one.txt", llama_dir)  # BOS + 1 token: a 2-token sequence
    assert batches[0].kwargs["input_ids"].shape == (1, 2)
    (tmp_path / "none.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(LoadError, match=r"hold 0 token\(s\) for .*llama's tokenizer: expected at least 2"):
        load_text_inputs(tmp_path / "none.txt", llama_dir)


def test_jsonl_text_fields_and_their_problems(llama_dir, tmp_path) -> None:
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps({"text": " ".join(WORDS), "id": i}) for i in range(4)) + "\n\n",
                    encoding="utf-8")
    batches, _ = load_text_inputs(good, llama_dir, seq_len=20, batch_size=2)
    assert len(batches) == 2  # 4 x 19 words = 76 tokens: 4 sequences of 19 after BOS
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(LoadError, match=r'line 2 has no "text" string'):
        load_text_inputs(bad, llama_dir)
    bad.write_text('{"text": "the cat"}\nnot json\n', encoding="utf-8")
    with pytest.raises(LoadError, match=r"line 2 is not JSON"):
        load_text_inputs(bad, llama_dir)


def test_a_byte_order_mark_is_no_text(llama_dir, tmp_path) -> None:
    """A leading UTF-8 byte-order mark (Windows editors) became an extra token of a .txt and made the first line of a
    .jsonl "not JSON" (user test): both read as the same file without it."""
    _story(tmp_path / "plain.txt", 20)
    body = (tmp_path / "plain.txt").read_bytes()
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + body)
    lines = "".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(6))
    (tmp_path / "plain.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    for stem in ("txt", "jsonl"):
        with_bom, desc_bom = load_text_inputs(tmp_path / f"bom.{stem}", llama_dir, seq_len=16, batch_size=2)
        plain, desc = load_text_inputs(tmp_path / f"plain.{stem}", llama_dir, seq_len=16, batch_size=2)
        assert [b.kwargs["input_ids"].tolist() for b in with_bom] == [b.kwargs["input_ids"].tolist() for b in plain]
        assert desc_bom.replace("bom.", "plain.") == desc


def test_not_utf8_names_the_byte(llama_dir, tmp_path) -> None:
    p = tmp_path / "latin.txt"
    p.write_bytes(b"the cat\n" * 1000 + b"caf\xe9\n")
    with pytest.raises(LoadError, match=r"latin.txt are not UTF-8 \(byte 8003: invalid continuation byte"):
        load_text_inputs(p, llama_dir)


def test_text_needs_a_model_directory_with_a_tokenizer(llama_dir, tmp_path) -> None:
    _story(tmp_path / "s.txt", 3)
    with pytest.raises(LoadError, match="is not a Hugging Face model directory: give the token ids as a torch.save'd"):
        load_text_inputs(tmp_path / "s.txt", tmp_path / "model.pt2")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(LoadError, match=r"tokenized with .*bare's tokenizer, and .*bare holds none \(no tokenizer.json"):
        load_text_inputs(tmp_path / "s.txt", bare)
    (bare / "tokenizer_config.json").write_text("{not json")  # there, but unusable: transformers' own reason
    with pytest.raises(LoadError, match=r"cannot load the tokenizer of .*bare to tokenize text inputs"):
        load_text_inputs(tmp_path / "s.txt", bare)
    with pytest.raises(LoadError, match=r"are text: load_text_inputs tokenizes them"):
        load_inputs(tmp_path / "s.txt")


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_analyze_and_the_sweeps_take_text_inputs(llama_dir, tmp_path) -> None:
    _story(tmp_path / "story.txt", 30)
    code, out = _run("analyze", str(llama_dir), "--inputs", str(tmp_path / "story.txt"), "--seq-len", "50",
                     "--strategy", "mxfp8", "--out", str(tmp_path / "a"), "--no-html", "--quiet")
    assert code == 0, out
    meta = json.loads((tmp_path / "a" / "results.json").read_text())["metadata"]
    assert meta["inputs"].startswith("story.txt: 3 batch(es) of 2 x 50 tokens (300 tokens read with llama's tokenizer")
    assert "note: text inputs" not in out  # (all of the text used: nothing to say)
    assert meta["loss"]["kind"] == "next-token" and meta["batches"] == 3
    code, out = _run("sweep-threshold", str(llama_dir), "--inputs", str(tmp_path / "story.txt"), "--batch-size", "1",
                     "--batches", "2", "--out", str(tmp_path / "t"), "--no-html", "--no-e2e", "--quiet")
    assert code == 0, out
    meta = json.loads((tmp_path / "t" / "results.json").read_text())["metadata"]
    assert meta["inputs"].startswith("story.txt: 2 batch(es) of 1 x 128 tokens")


def test_text_options_with_saved_inputs_and_text_problems_exit_2(llama_dir, tmp_path) -> None:
    torch.save({"input_ids": torch.randint(0, 20, (2, 8))}, tmp_path / "ids.pt")
    code, out = _run("analyze", str(llama_dir), "--inputs", str(tmp_path / "ids.pt"), "--seq-len", "64",
                     "--out", str(tmp_path / "x"))
    assert code == 2
    assert "--seq-len cut text --inputs (.txt, .jsonl) into token batches: expected text inputs, got --inputs" in out
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    code, out = _run("analyze", str(llama_dir), "--inputs", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "y"))
    assert code == 2 and "are not UTF-8 (byte 0: invalid start byte)" in out and "Traceback" not in out
    assert not (tmp_path / "y" / "results.json").exists()


def test_a_text_longer_than_the_models_max_length_prints_no_tokenizer_warning(llama_dir, tmp_path) -> None:
    """A chunk of text is longer than model_max_length by design (it is cut into sequences after): transformers'
    "Token indices sequence length is longer than ..." warning would tell the user of indexing errors that never
    happen."""
    d = _copy_with(llama_dir, tmp_path / "short-max", "tokenizer_config.json", model_max_length=16)
    _story(tmp_path / "story.txt", 20)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger("transformers")  # (its library loggers hand their records up to it)
    root.addHandler(handler)
    try:
        batches, _ = load_text_inputs(tmp_path / "story.txt", d, seq_len=32)
        assert batches[0].kwargs["input_ids"].shape == (2, 32)
        transformers.AutoTokenizer.from_pretrained(d)("the cat " * 20)  # (the warning this test would see)
    finally:
        root.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert sum("sequence length is longer" in m for m in messages) == 1, messages


def test_text_options_without_text_inputs_are_refused_before_anything_loads(tmp_path) -> None:
    """A weights-only checkpoint (no --inputs) went down its own path with --seq-len silently unused."""
    torch.save({"w.weight": torch.randn(8, 8)}, tmp_path / "sd.pt")
    for cmd in ("analyze", "sweep-blocksize"):
        code, out = _run(cmd, str(tmp_path / "sd.pt"), "--batch-size", "4", "--out", str(tmp_path / cmd))
        assert code == 2 and "--batch-size cut text --inputs (.txt, .jsonl) into token batches: expected text " \
                             "inputs, got no --inputs" in out
        assert not (tmp_path / cmd).exists()
    code, out = _run("analyze", str(tmp_path / "missing-model"), "--inputs", "x.pt", "--seq-len", "8")
    assert code == 2 and "--seq-len cut text --inputs" in out  # (before the model that does not exist)


def test_text_options_from_the_environment_do_not_fail_runs_on_saved_inputs(llama_dir, tmp_path) -> None:
    """A CI job's FP8PROBE_ANALYZE_SEQ_LEN for its text runs refused its runs on saved token ids, as if --seq-len
    had been typed, naming no variable (user test): it is dropped there, with a note naming it."""
    torch.save({"input_ids": torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(3))},
               tmp_path / "ids.pt")
    result = CliRunner().invoke(cli, ["analyze", str(llama_dir), "--inputs", str(tmp_path / "ids.pt"), "-s", "global",
                                      "--no-e2e", "--no-html", "-q", "--out", str(tmp_path / "x")],
                                env={"FP8PROBE_ANALYZE_SEQ_LEN": "16", "FP8PROBE_ANALYZE_BATCH_SIZE": "4"})
    assert result.exit_code == 0, result.output
    assert ("note: FP8PROBE_ANALYZE_SEQ_LEN (--seq-len), FP8PROBE_ANALYZE_BATCH_SIZE (--batch-size) from the "
            "environment had no effect here") in result.stderr
    meta = json.loads((tmp_path / "x" / "results.json").read_text())["metadata"]
    assert meta["inputs"].endswith("ids.pt")  # (the saved ids as they are)


def test_the_sequence_length_follows_the_models_positions(llama_dir, tmp_path) -> None:
    """A GPT-2 with 16 positions failed on the default 128-token sequences with "index out of range in self"."""
    d = _copy_with(llama_dir, tmp_path / "short-positions", "config.json", max_position_embeddings=16)
    assert loading.max_positions(d) == 16 and loading.max_positions(llama_dir) == 256
    _story(tmp_path / "s.txt", 10)
    batches, _ = load_text_inputs(tmp_path / "s.txt", d)
    assert batches[0].kwargs["input_ids"].shape == (2, 16)
    with pytest.raises(LoadError, match=r"--seq-len 17 is longer than the 16 positions short-positions's config.json "
                                        r"allows: expected --seq-len 16 or less"):
        load_text_inputs(tmp_path / "s.txt", d, seq_len=17)


def test_the_command_line_cuts_at_most_8_batches_unless_told(llama_dir, tmp_path) -> None:
    _story(tmp_path / "story.txt", 60)  # 600 tokens: 9 batches of 2 x 33
    code, out = _run("analyze", str(llama_dir), "--inputs", str(tmp_path / "story.txt"), "--seq-len", "33",
                     "--strategy", "int8", "--no-e2e", "--no-html", "--quiet", "--out", str(tmp_path / "a"))
    assert code == 0, out
    meta = json.loads((tmp_path / "a" / "results.json").read_text())["metadata"]
    assert meta["batches"] == 8
    assert "note: text inputs story.txt: 8 batch(es) of 2 x 33 tokens (" in out  # (the terminal says it too)
    assert "(600 tokens read with llama's tokenizer; the last 88 unused; at most 8 batches: --batches for more;" \
        in meta["inputs"]


def test_a_text_shorter_than_one_batch_says_so(llama_dir, tmp_path) -> None:
    """--batch-size 2 --seq-len 8 on a 5-word text ran "1 batch(es) of 1 x 6 tokens" with no word that the shape was
    not the one asked for (user test)."""
    (tmp_path / "short.txt").write_text("the cat sat on mat", encoding="utf-8")
    code, out = _run("analyze", str(llama_dir), "--inputs", str(tmp_path / "short.txt"), "--seq-len", "8",
                     "--strategy", "int8", "--no-e2e", "--no-html", "--quiet", "--out", str(tmp_path / "a"))
    assert code == 0, out
    assert "note: text inputs short.txt: 1 batch(es) of 1 x 6 tokens (" in out
    assert "the text is shorter than one batch of 2 x 8" in out
    _story(tmp_path / "story.txt", 60)  # (a text that fills its batches gets no such note)
    code, out = _run("analyze", str(llama_dir), "--inputs", str(tmp_path / "story.txt"), "--seq-len", "33",
                     "--batches", "2", "--strategy", "int8", "--no-e2e", "--no-html", "--quiet", "--out",
                     str(tmp_path / "b"))
    assert code == 0 and "shorter than one batch" not in out, out


def test_pieces_cut_before_whitespace_tokenize_as_the_whole_text(llama_dir, tmp_path, monkeypatch) -> None:
    """A text of one long line was read whole (a 1 GB line, 1 GB in memory). Pieces are now cut before a space, so
    the ids equal the whole text's, however long its lines."""
    rng = random.Random(1)
    text = "  ".join(rng.choice(WORDS) for _ in range(3000))  # one line
    (tmp_path / "line.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(loading, "TEXT_CHUNK_CHARS", 97)
    pieces = list(loading._text_chunks(tmp_path / "line.txt"))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 2 * 97
    assert all(p.startswith(" ") for p in pieces[1:])  # (the space leads the next piece)
    batches, _ = load_text_inputs(tmp_path / "line.txt", llama_dir, seq_len=101, batch_size=1)
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = torch.cat([b.kwargs["input_ids"][:, 1:] for b in batches]).reshape(-1).tolist()
    assert got == ids and len(batches) == 30  # (the command line's 8-batch default is not the library's)
