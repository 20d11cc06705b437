"""Data at size and data variety: text read only as far as its token budget needs, in bounded memory, with the same
tokens and records as reading it whole; many files, compressed files, files that change, odd line ends and bytes.

The memory tests run the reader in a child process and compare its peak RSS on a file and on one 10x larger (a
ratio of sizes, no timing): before, every file was read whole into one str (and joined into another) first."""

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_text

from clakit import corpus
from clakit.convert.calibrate import calib_input_ids
from clakit.corpus import Text, join_texts, load_texts
from clakit.errors import ClakitError
from clakit.eval import passkey, perplexity
from clakit.provenance import text_sha256

TESTS = Path(__file__).parent
SMALL_MB, LARGE_MB = 4, 40  # the large file is 10x the small one
GROWTH_LIMIT_MB = 16  # peak RSS may grow this much from the small file to the large (read whole: >= 72 MB more)


def _write_text(path: Path, mb: int) -> Path:
    """`mb` MB of pseudo-text, written a block at a time (a .gz is compressed as it is written)."""
    block = (make_text(20_000, seed=5) + "\n").encode()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        for _ in range(mb * 2**20 // len(block) + 1):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    d = tmp_path_factory.mktemp("sized")
    return {
        (suffix, mb): _write_text(d / f"{mb}{suffix}", mb)
        for suffix in (".txt", ".txt.gz")
        for mb in (SMALL_MB, LARGE_MB)
    }


READERS = {
    # `clakit eval --max-tokens 8192`'s tokens and its passkey filler, as the eval suite reads them
    "eval-max-tokens": "perplexity.tokenize(tok, corpus.load_texts([path]), 8192)",
    "passkey-filler": "passkey.prepare(tok, corpus.load_texts([path]), passkey.PasskeySettings(lengths=[4096]), 8192)",
    # `clakit convert --calib-data F --calib-tokens 4096 --seq-len 256`'s windows
    "calibration": "calib_input_ids(tok, corpus.load_texts([path]), 4096, 256)",
    # uptrain's data.train with an 8,192-token budget (the held-out tail cut from the same file)
    "uptrain-data": "build_data(DataSection(train=[str(path)], seq_len=64, eval_max_tokens=1024), tok, 8192)",
}


def _peak_growths_mb(path: Path) -> dict[str, float]:
    """{reader: peak RSS growth (MB)} of one child process reading `path` with each reader in turn: its peak (VmHWM)
    is reset before each (the tokenizer's training peaks higher than a 200 MB read) and read after it."""
    runs = "\n".join(
        f"gc.collect(); reset(); before = peak(); {code}; print({name!r}, (peak() - before) / 1024)"
        for name, code in READERS.items()
    )
    code = (
        textwrap.dedent(f"""
        import gc, sys
        sys.path.insert(0, {str(TESTS)!r})
        from conftest import build_tokenizer
        from clakit import corpus
        from clakit.convert.calibrate import calib_input_ids
        from clakit.eval import passkey, perplexity
        from clakit.uptrain.packing import build_data
        from clakit.uptrain.recipe import DataSection
        def peak():
            return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1])
        def reset():
            open("/proc/self/clear_refs", "w").write("5")  # VmHWM back to the current RSS
        tok, path = build_tokenizer(), {str(path)!r}
    """)
        + runs
    )
    env = {**os.environ, "PYTHONPATH": str(Path(corpus.__file__).parents[1])}  # this tree's clakit
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split()[0]: float(line.split()[1]) for line in out.stdout.strip().splitlines()}


@pytest.fixture(scope="module")
def growths(sized):
    return {key: _peak_growths_mb(path) for key, path in sized.items()}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through /proc")
@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"], ids=["text", "gzip"])
@pytest.mark.parametrize("reader", list(READERS))
def test_memory_does_not_grow_with_the_text_behind_a_token_budget(growths, reader, suffix):
    """A 10x larger file (40 MB; a .txt.gz that unpacks to it: a small gzip bomb) behind the same token budget: the
    peak memory stays where it was. Before, the whole text was read into memory first (and joined into a second
    copy; uptrain's split copied it again): on a 200 MB file +400 MB (eval, calibration), +800 MB (uptrain)."""
    small, large = growths[suffix, SMALL_MB][reader], growths[suffix, LARGE_MB][reader]
    assert large - small < GROWTH_LIMIT_MB, f"{reader}: peak RSS grew {small:.0f} -> {large:.0f} MB"


# --- the same tokens and records as reading the text whole --------------------------------------------------------


@pytest.fixture
def three_files(tmp_path):
    texts = {"a.txt": make_text(3_000, 1), "b.txt": make_text(200, 2), "c.txt": make_text(6_000, 3)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    return [str(tmp_path / name) for name in texts]


@pytest.mark.parametrize("max_tokens", [None, 16, 700, 2_000, 10**6])
def test_tokens_read_lazily_are_the_tokens_of_the_joined_text(tokenizer, three_files, max_tokens):
    texts = load_texts(three_files)
    lazy = perplexity.tokenize(tokenizer, texts, max_tokens)
    whole = perplexity.tokenize(tokenizer, join_texts(texts), max_tokens)
    assert torch.equal(lazy.ids, whole.ids) and lazy.text == whole.text


def test_passkey_prompts_and_calibration_windows_are_those_of_the_joined_text(tokenizer, three_files):
    texts = load_texts(three_files)
    settings = passkey.PasskeySettings(lengths=[200, 400], samples=2)
    lazy, whole = (passkey.prepare(tokenizer, t, settings, 512) for t in (texts, join_texts(texts)))
    assert [p.ids.tolist() for c in lazy.cells for p in c] == [p.ids.tolist() for c in whole.cells for p in c]
    in_memory = [Text(t.name, t.text) for t in texts]
    assert torch.equal(calib_input_ids(tokenizer, texts, 256, 32), calib_input_ids(tokenizer, in_memory, 256, 32))


def test_a_streamed_sha256_is_the_sha256_of_the_joined_text(three_files):
    texts = load_texts(three_files)
    assert corpus.texts_sha256(texts) == text_sha256(join_texts(texts))
    assert corpus.head(texts, 5_000) == join_texts(texts)[:5_000]


def test_a_file_that_changes_after_it_was_first_read_is_refused_when_read_again(tokenizer, tmp_path):
    """A file is read when its tokens are needed, not once at the start: one rewritten (or appended to) in between
    would give tokens of one text and a record's sha256 of another. Refused, in one line naming it."""
    path = tmp_path / "growing.txt"
    path.write_text(make_text(2_000, 4))
    texts = load_texts([str(path)])
    with path.open("a") as f:
        f.write("a line appended by a crawler still writing the file\n")
    with pytest.raises(ClakitError, match=r"growing.txt changed while clakit was reading it") as e:
        perplexity.tokenize(tokenizer, texts, 100)
    assert "\n" not in str(e.value)


# --- calibration windows spread over the whole text ----------------------------------------------------------------


def _numbered(lines: int, line_end: str = "\n", first: int = 0) -> str:
    """Lines that say where they are (`line 123 of ...`), with words of several scripts: a window's text names
    the part of the file it came from, and a byte offset can land inside a multi-byte character."""
    return "".join(f"line {i} Ünïcödé 日本語 текст {make_text(12, i)}{line_end}" for i in range(first, first + lines))


@pytest.mark.parametrize("suffix,line_end", [(".txt", "\n"), (".txt", "\r\n"), (".txt", "\r"), (".txt.gz", "\n")])
def test_calibration_windows_are_spread_over_the_whole_of_a_long_text(tokenizer, tmp_path, suffix, line_end):
    """docs/convert.md: the --calib-tokens windows are spread evenly over the text. Past 64 characters per wanted
    token only the text's head was tokenised and the windows spread over that: at --calib-tokens 512 here, every
    window came from the first 6% of the file. Now a span is read at each of n_seq points over all of it (seeking in
    a plain file; CRLF and CR read as LF, as everywhere), and each window is text of the file."""
    text = _numbered(6_000, line_end)
    path = tmp_path / f"big{suffix}"
    (gzip.open if suffix.endswith(".gz") else open)(path, "wb").write(text.encode())
    ids = calib_input_ids(tokenizer, load_texts([str(path)]), 512, 64)
    as_read = text.replace("\r\n", "\n").replace("\r", "\n")
    where = [as_read.find(tokenizer.decode(row)) / len(as_read) for row in ids]  # the window's place in the text
    assert ids.shape == (8, 64) and max(where) > 0.8, [round(w, 3) for w in where]  # from all of it
    assert min(where) >= 0 and where == sorted(where) and where[0] < 0.01, where  # each window is text of the file
    assert "\ufffd" not in "".join(tokenizer.decode(row) for row in ids)


def test_spread_windows_are_the_same_on_every_read(tokenizer, tmp_path):
    """Reproducible: the same file gives the same windows (a rerun reads the same tokens), from several files too."""
    for name, seed in (("a.txt", 1), ("b.txt", 2)):
        (tmp_path / name).write_text(_numbered(3_000 * seed, first=10_000 * seed))
    specs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    first = calib_input_ids(tokenizer, load_texts(specs), 1024, 64)
    assert torch.equal(first, calib_input_ids(tokenizer, load_texts(specs), 1024, 64)) and len(first) == 16
    decoded = [tokenizer.decode(row) for row in first]
    assert sum(d in (tmp_path / "a.txt").read_text() for d in decoded) in range(4, 8)  # ~1/3 of the text


# --- text variety --------------------------------------------------------------------------------------------------


class CountingTokenizer:
    """A tokenizer that counts the characters it was given (the eval code calls it, reads its ids and offsets)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0
        self.bos_token_id, self.eos_token_id, self.is_fast = tokenizer.bos_token_id, tokenizer.eos_token_id, True

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


def _long_word_tokenizer():
    """Every 40-character word one token: more than the 16 characters a token the first cut of the text assumes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, **{c * 40: i + 2 for i, c in enumerate("xyz")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")


def test_a_text_of_long_tokens_is_read_in_growing_heads_not_whole():
    """When the first cut (16 characters a token) holds too few tokens, the whole text was tokenised (a 2 GB
    file whole, for 100 tokens): now a head 4x longer, until it holds enough. Same tokens either way."""
    text = " ".join(("x" * 40, "y" * 40, "z" * 40)[i % 3] for i in range(60_000))  # 2.4 MB, 41 chars a token
    counting = CountingTokenizer(_long_word_tokenizer())
    tokens = perplexity.tokenize(counting, text, 100)
    assert counting.chars < 0.01 * len(text), f"{counting.chars} of {len(text)} characters tokenised"
    assert tokens.ids.tolist() == [0] + [2, 3, 4] * 33 + [2] and tokens.text == text[: 100 * 41 - 1]


def test_max_tokens_takes_the_whole_texts_first_tokens_when_the_cut_falls_inside_a_word():
    """A text of ~17 characters a token: the 16-characters-a-token cut fell inside a word, whose pieces became the
    last scored tokens (" agf" for " agfwdpgxzbvarntd" at max_tokens 1030, helper 50d)."""
    import random
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(16)) for _ in range(50)]
    text = " ".join(rng.choice(words) for _ in range(20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<e>"], initial_alphabet=alphabet)
    tok.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<e>", bos_token="<e>")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for keep in (1030, 1000, 2000):
        assert perplexity.tokenize(tokenizer, text, keep).ids.tolist()[1:] == whole[:keep]


def test_a_str_with_lone_surrogates_is_tokenised_as_files_read_undecodable_bytes(tokenizer):
    """A str given in code (evaluate(text=...), a Text of one's own) read from a file with errors="surrogateescape"
    holds lone surrogates: the tokenizer raised a TypeError traceback ("TextEncodeInput must be Union[...]"). They
    read as U+FFFD now, as an undecodable byte of a file clakit reads itself does, and the record's text says so."""
    raw = b"caf\xe9 \xff\n" + (make_text(400, 6) + "\n").encode()
    given = raw.decode("utf-8", "surrogateescape") * 3  # caf\udce9 \udcff
    tokens = perplexity.tokenize(tokenizer, given, 200)
    assert "\ufffd" in tokens.text and not corpus.SURROGATE.search(tokens.text)
    assert tokens.text == raw.decode("utf-8", "replace")[: len(tokens.text)]
    assert calib_input_ids(tokenizer, [Text("given", given)], 64, 32).shape == (2, 32)
    assert passkey.prepare(tokenizer, given, passkey.PasskeySettings(lengths=[400], samples=1), 512).cells


@pytest.mark.parametrize("line_end", ["\r\n", "\r"])
def test_line_ends_read_in_pieces_are_those_read_whole(tmp_path, line_end):
    """CRLF and CR read as LF also where a piece ends between the CR and the LF (pieces of 7 characters here)."""
    text = line_end.join(f"line {i} Ünïcödé" for i in range(400)) + line_end
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a byte-order mark, dropped
    t = load_texts([str(path)])[0]
    assert "".join(t.pieces(7)) == t.text == text.replace(line_end, "\n") == t.head(10**6)
    assert t.part(5, 40).text == t.text[5:40] and t.chars() == len(t.text)


def test_a_folder_with_a_symlink_loop_lists_each_file_once(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("alpha\n")
    (tmp_path / "data" / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "data" / "sub" / "loop").symlink_to(tmp_path / "data")  # data/sub/loop/sub/loop/...
    (tmp_path / "data" / "gone.txt").symlink_to(tmp_path / "missing.txt")  # a dangling link: no file
    names = [Path(t.name).relative_to(tmp_path / "data").as_posix() for t in load_texts([str(tmp_path / "data")])]
    assert names == ["a.txt", "sub/b.txt"]


def test_binary_bytes_are_refused_in_the_text_read_and_not_looked_for_beyond_it(tokenizer, tmp_path):
    """A NUL in the part of a file a reader reads refuses it in one line; a budget that ends before it reads no
    further (a 30 GB dump with a stray NUL at its end is usable for 8k tokens). Reading it all refuses it."""
    path = tmp_path / "dump.txt"
    path.write_bytes(make_text(250_000, 8).encode() + b"\n\x00\x01\x02 binary tail\n")  # past load_texts' 1 MiB
    texts = load_texts([str(path)])
    assert len(perplexity.tokenize(tokenizer, texts, 100).ids) == 101
    with pytest.raises(ClakitError, match=r"dump.txt .*\(binary data\?\)") as e:
        perplexity.tokenize(tokenizer, texts, None)
    assert "\n" not in str(e.value)
    path.write_bytes(b"\x00" + path.read_bytes())
    with pytest.raises(ClakitError, match=r"dump.txt .*\(binary data\?\)"):
        load_texts([str(path)])  # in the start, which load_texts reads: before any work


def test_train_documents_shorter_than_the_copy_span_still_pack_with_copies(tokenizer, tmp_path):
    """data.train a folder of 300 documents of a few tokens each, copy_span longer than any of them: the copies
    are taken across documents inside a window (each document ends with EOS), and every window is still whole."""
    from clakit.uptrain.packing import build_data
    from clakit.uptrain.recipe import DataSection

    (tmp_path / "docs").mkdir()
    for i in range(300):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(f"doc {i} ends.\n")
    section = DataSection(train=[str(tmp_path / "docs")], seq_len=32, eval_max_tokens=64, copy_fraction=0.5,
                          copy_span=12)  # fmt: skip
    data = build_data(section, tokenizer, None)
    copied = [row for row in data.train if any(torch.equal(row[s : s + 12], row[-12:]) for s in range(9))]
    assert data.train.shape[1] == 32 and len(copied) >= round(0.5 * len(data.train)) and len(data.eval) >= 1
    eos = tokenizer.eos_token_id
    assert (data.train == eos).sum() > len(data.train)  # several documents a window


class CountingText(Text):
    """A file read lazily that counts the characters read from it."""

    read = 0

    def pieces(self, *size):
        for piece in super().pieces(*size):
            CountingText.read += len(piece)
            yield piece


def test_a_held_out_file_is_compared_with_a_large_train_text_by_its_start_first(tmp_path):
    """data.eval is refused when it copies a train file (by content, whitespace at the ends aside): every train file
    was read whole and hashed for it (a 30 GB data.train read through at every start). Now their starts are
    compared first, and only texts whose starts agree are read whole."""
    from clakit.uptrain.packing import check_not_copied

    big = make_text(400_000, 9)  # ~2.3 MB
    (tmp_path / "train.txt").write_text(big)
    (tmp_path / "held.txt").write_text(make_text(2_000, 10))
    (tmp_path / "copy.txt").write_text("\n\n" + big + "\n  \n")  # the same text, other blank lines at its ends
    (tmp_path / "near.txt").write_text(big[:-10] + "other end.")  # the same start, another text
    train = [CountingText.file(tmp_path / "train.txt")]
    CountingText.read = 0
    check_not_copied([Text.file(tmp_path / "held.txt"), Text.file(tmp_path / "near.txt")], {"data.train": train})
    assert CountingText.read < 2 * len(big), CountingText.read  # its start, and whole once for near.txt only
    CountingText.read = 0
    check_not_copied([Text.file(tmp_path / "held.txt")], {"data.train": train})
    assert CountingText.read < 0.1 * len(big), CountingText.read
    with pytest.raises(ClakitError, match=r"data.eval .*copy.txt holds the same text as data.train .*train.txt"):
        check_not_copied([Text.file(tmp_path / "copy.txt")], {"data.train": train})


def test_a_text_without_line_ends_is_cut_between_words_not_inside_one(tokenizer):
    """uptrain tokenises in ~1 MB pieces cut at line ends; a text with none (one 500 MB line) was cut every
    1,048,576 characters wherever that fell, inside a word, whose halves became other tokens. Now before a space:
    the pieces' tokens are the whole text's."""
    from clakit.uptrain.packing import tokenize

    text = make_text(400_000, 12).replace("\n", " ")  # ~2.3 MB on one line
    ids = tokenize(tokenizer, [Text("one-line", text)])
    whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.tolist() == whole, f"{len(ids)} tokens, {len(whole)} whole"


def test_spread_spans_are_the_same_from_a_file_a_gz_and_memory(tmp_path):
    """ASCII text with LF line ends has as many bytes as characters: seeking in a plain file, one pass through a
    .gz and slicing a str must give the same spans, also across files (a span running on past its file's end)."""
    parts = [_numbered(50).encode("ascii", "replace").decode(), make_text(300, 3) + "\n", make_text(3_000, 4)]
    plain, packed = [], []
    for i, text in enumerate(parts):
        (tmp_path / f"{i}.txt").write_text(text)
        with gzip.open(tmp_path / f"{i}.txt.gz", "wt") as f:
            f.write(text)
        plain.append(str(tmp_path / f"{i}.txt"))
        packed.append(str(tmp_path / f"{i}.txt.gz"))
    in_memory = [Text(str(i), text) for i, text in enumerate(parts)]
    mixed = [plain[0], packed[1], plain[2]]
    expected = corpus.spread(in_memory, 7, 900)
    assert len(expected) == 7 and all(expected) and expected[3] != expected[4]
    for specs in (plain, packed, mixed):
        assert corpus.spread(load_texts(specs), 7, 900) == expected


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_a_folder_of_many_small_files_leaves_no_file_open(tokenizer, tmp_path):
    """A folder of 2,000 small .txt files behind budgets: each file read lazily (its start by load_texts, its share
    by the packing, the eval head) and closed again, also when a reader stops inside it."""
    from clakit.uptrain.packing import build_data
    from clakit.uptrain.recipe import DataSection

    for i in range(2_000):
        (tmp_path / "docs" / f"{i // 100:02d}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / f"{i // 100:02d}" / f"{i:04d}.txt").write_text(make_text(30, i) + "\n")
    before = len(os.listdir("/proc/self/fd"))
    texts = load_texts([str(tmp_path / "docs")])
    assert len(texts) == 2_000 and len(perplexity.tokenize(tokenizer, texts, 500).ids) == 501
    data = build_data(DataSection(train=[str(tmp_path / "docs")], seq_len=32, eval_max_tokens=64), tokenizer, 2_048)
    assert 1_850 < len(data.train_sources) < 2_000 and data.train.numel() >= 2_048  # the tail 5%: held out
    assert calib_input_ids(tokenizer, texts, 256, 32).shape == (8, 32)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_calibration_file_edited_during_the_fits_is_recorded_as_read_not_refused_at_the_end(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch
):
    """The record's calib_sha256 was computed in the conversion's last step from the texts read again: a calibration
    file edited while the fits ran (hours at 70B) had the finished conversion refused at the end ('changed since it
    was first read'). It is hashed with the windows now, so the record names the text the fits read."""
    import json

    from clakit.convert import ConvertConfig, calibrate, convert

    calib = tmp_path / "calib.txt"
    calib.write_text((corpus_dir / "calib.txt").read_text())
    read = text_sha256(calib.read_text())
    fit_kv = calibrate.fit_kv

    def edited_meanwhile(*args, **kwargs):
        calib.write_text("another text altogether\n" * 50)
        return fit_kv(*args, **kwargs)

    monkeypatch.setattr(calibrate, "fit_kv", edited_meanwhile)
    config = ConvertConfig(factor=2, init="calibrated", calib_data=[str(calib)], calib_tokens=256, device="cpu")
    convert(tiny_llama_checkpoint, tmp_path / "out", config, quiet=True)
    record = json.loads((tmp_path / "out" / "clakit_convert.json").read_text())
    assert record["settings"]["calib_sha256"] == read


def test_near_copies_of_fitted_text_are_found_by_their_lines_and_other_texts_pass(tmp_path):
    """Held-out text was compared with fitted text only whole (strip() equal): half of a training file, or the file
    plus a line, passed as held-out. `corpus.near_copy` compares long lines: half of the held-out set's or more
    found is a near-copy (naming the file holding most), whatever the line ends and indentation; unrelated text,
    text sharing a few lines, a short text of few long lines, and a folder of unseen text holding one small file of
    a licence header the fitted text also carries pass."""
    train = make_text(6_000, 21)
    header = "\n".join(f"# Licensed under the Apache License, Version 2.0 (the License) line {i}" for i in range(9))
    files = {
        "train.txt": header + "\n" + train,
        "other.txt": make_text(6_000, 22),
        "half.txt": train[len(train) // 2 :],
        "plus.txt": train + "\nA line of my own that the model was never trained on.\n",
        "crlf.txt": "\r\n".join("   " + line for line in train.splitlines()[:200]),
        "few.txt": make_text(6_000, 23) + "\n" + "\n".join(train.splitlines()[:20]),
        "short.txt": "\n".join(train.splitlines()[:5]),
        "header.txt": header + "\nprint('hello')\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    text = {name: Text.file(tmp_path / name) for name in files}
    fitted = {"data.train": [text["other.txt"], text["train.txt"]], "calibration text": []}
    for name in ("half.txt", "plus.txt", "crlf.txt"):
        group, found = corpus.near_copy([text["short.txt"], text[name]], fitted)
        assert (group, found.worst, found.holder) == ("data.train", text[name], str(tmp_path / "train.txt")), name
        assert found.found >= corpus.NEAR_COPY * found.lines, found
        assert "lines of 40+ characters are in data.train, most of them from" in found.text(group)
    for name in ("other.txt", "few.txt", "short.txt"):
        assert corpus.near_copy([text[name]], {"data.train": [text["train.txt"]]}) is None, name
    # a held-out folder of unseen text with one small file mostly a shared licence header: not a near-copy
    assert corpus.near_copy([text["few.txt"], text["header.txt"]], {"data.train": [text["train.txt"]]}) is None
    assert corpus.near_copy([text["header.txt"]], {"data.train": [text["train.txt"]]}) is not None  # alone: it is


def test_the_near_copy_check_reads_nothing_where_no_text_is_fitted(tmp_path):
    """The default uptrain (eval_fraction of one train file, no calibration) has no fitted text to compare the tail
    with: the held-out text was read and hashed whole anyway, once per empty group (17 s and 0.5 GB for 300 MB)."""
    (tmp_path / "held.txt").write_text(make_text(2_000, 10))
    CountingText.read = 0
    held = [CountingText.file(tmp_path / "held.txt")]
    assert corpus.near_copy(held, {"data.train": [], "calibration text": []}) is None and CountingText.read == 0


def test_a_file_beside_its_folder_is_named_once_only_where_the_folder_reads_it(tmp_path):
    """check_each_once refuses a text named twice, but a folder reads only its non-hidden .txt: a README.md or a
    hidden draft given beside it is read once, and was refused. A missing file named twice is refused as missing."""
    corpus_dir = tmp_path / "corpus"
    (corpus_dir / ".drafts").mkdir(parents=True)
    for name in ("a.txt", "README.md", ".drafts/x.txt"):
        (corpus_dir / name).write_text(make_text(50, 1) + name)
    for extra in ("README.md", ".drafts/x.txt"):
        assert len(load_texts([str(corpus_dir), str(corpus_dir / extra)], "--data")) == 2
    with pytest.raises(ClakitError, match="--data names the same text twice"):
        load_texts([str(corpus_dir), str(corpus_dir / "a.txt")], "--data")
    with pytest.raises(ClakitError, match="nosuch.txt' does not exist"):
        load_texts([str(tmp_path / "nosuch.txt")] * 2, "--data")
    # the recipe's checks across keys (data.eval beside data.train's folder) read the same rule
    assert corpus.holds(str(corpus_dir), str(corpus_dir / "a.txt"))
    assert not any(corpus.holds(str(corpus_dir), str(corpus_dir / n)) for n in ("README.md", ".drafts/x.txt"))
