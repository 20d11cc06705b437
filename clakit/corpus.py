"""Text for calibration, evaluation and training: files, folders of .txt, or `datasets` specs.

A spec is one of
  * a path to a text file (`.txt`, `.md`, anything UTF-8; `.gz` is decompressed),
  * a path to a folder: every `*.txt` / `*.txt.gz` below it, sorted by name, except hidden files and folders
    (`.ipynb_checkpoints/`, `.git/`: editors' and tools' copies would count the same text twice),
  * a `datasets` spec `NAME[:CONFIG[:SPLIT]]`, e.g. `wikitext:wikitext-2-raw-v1:test` (needs `pip install datasets`
    and the Hub; the text column is `text`).

A file is read lazily: `load_texts` checks its start (readable, UTF-8, not empty) and each reader reads only what it
uses, READ_CHARS characters at a time (`head` for a token budget, `pieces` for a stream), so a 30 GB corpus behind a
budget of 32k tokens costs megabytes, not its size in memory. A file that changed since `load_texts` saw it is
refused when read again: the text a record names (its sha256) must be the text the tokens came from.
"""

import contextlib
import gzip
import hashlib
import io
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clakit.errors import ClakitError
from clakit.paths import check_utf8, expand

DEFAULT_ONLINE_EVAL = "wikitext:wikitext-2-raw-v1:test"
READ_CHARS = 1 << 20  # characters read from a file at a time: memory per read is bounded, whatever the file's size
SEPARATOR = "\n\n"  # between documents joined into one text (join_texts)

# Share of undecodable bytes (U+FFFD after errors="replace") above which a file is binary, not text with a few
# stray bytes: a model shard or an archive given as text would otherwise be tokenised as noise. Judged on the text
# read so far (a file read whole in one piece: on all of it).
MAX_UNDECODABLE = 0.01
# A str given in code may hold UTF-16 surrogates (a file read with errors="surrogateescape" holds U+DC80..U+DCFF for
# its undecodable bytes), which no tokenizer takes (a TypeError from `tokenizers`): they become U+FFFD, as a file's
# undecodable bytes do when clakit reads it.
SURROGATE = re.compile("[\ud800-\udfff]")
# control characters text does not hold (tab, newline, form feed and carriage return aside): binary data has them
CONTROL = re.compile("[\x01-\x08\x0b\x0e-\x1f\x7f]")


class Text:
    """A named text: in memory (`Text(name, text)`), or a file (`Text.file(path)`) read only as far as its reader
    asks, from character `start` to `stop` (a part of a file: uptrain's held-out tail)."""

    def __init__(self, name: str, text: str | None = None, *, path=None, start=0, stop=None, stamp=None):
        text = text if text is None or not SURROGATE.search(text) else SURROGATE.sub("\ufffd", text)
        self.name, self._text, self.path, self.start, self.stop, self._stamp = name, text, path, start, stop, stamp
        self._chars: int | None = None if text is None else len(text)

    @classmethod
    def file(cls, path: Path) -> "Text":
        return cls(str(path), path=path, stamp=_stamp(path))

    @property
    def text(self) -> str:
        """All of it, read now (not kept: a reader that needs less uses `head` or `pieces`)."""
        if self._text is not None:
            return self._text
        return _file_whole(self) if (self.start, self.stop) == (0, None) else "".join(self.pieces())

    def pieces(self, size: int = READ_CHARS) -> Iterator[str]:
        """The text in order, at most `size` characters a piece."""
        if self._text is not None:
            yield from (self._text[i : i + size] for i in range(0, len(self._text), size))
        else:
            yield from _file_pieces(self, size)

    def head(self, chars: int) -> str:
        return head([self], chars)

    def chars(self) -> int:
        """Its length in characters (a file: counted by reading it through once, in bounded memory)."""
        if self._chars is None:
            self._chars = sum(len(p) for p in self.pieces())
        return self._chars

    def part(self, start: int, stop: int | None = None) -> "Text":
        """Characters start..stop of it, as a Text of the same name (a file's part is read lazily too)."""
        if self._text is not None:
            return Text(self.name, self._text[start:stop])
        top = None if stop is None else self.start + stop
        top = top if self.stop is None or top is None else min(top, self.stop)
        part = Text(self.name, path=self.path, start=self.start + start, stop=self.stop if top is None else top,
                    stamp=self._stamp)  # fmt: skip
        if self._chars is not None:  # known: not counted again by reading (uptrain's split, then its shares)
            part._chars = max(min(self._chars, self._chars if stop is None else stop) - start, 0)
        return part

    def __eq__(self, other) -> bool:
        return isinstance(other, Text) and (self.name, self.text) == (other.name, other.text)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}, start={self.start}, stop={self.stop}" if self._text is None else "text=..."
        return f"Text({self.name!r}, {where})"


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise ClakitError(f"cannot read text file {path}: {e.strerror or e}") from None
    return st.st_size, st.st_mtime_ns


def _open(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    # utf-8-sig: a byte-order mark (Windows editors write one) is no text; scored, it would make the same text read
    # as another (3 more bytes, other tokens, another sha256). Universal newlines: CRLF and CR read as LF.
    return opener(path, "rt", encoding="utf-8-sig", errors="replace")


def _file_pieces(t: Text, size: int) -> Iterator[str]:
    """Characters t.start..t.stop of t's file, `size` at a time; the text before `start` is read (and checked) too:
    a character offset of UTF-8 text has no byte offset to seek to."""
    at, check = 0, _Check(Path(t.path))
    with _opened(t) as f:
        while t.stop is None or at < t.stop:
            piece = f.read(size if t.stop is None else min(size, t.stop - at))
            if not piece:
                break
            check(piece)
            lo = max(t.start - at, 0)
            at += len(piece)
            if lo < len(piece):
                yield piece[lo:]


def _file_whole(t: Text) -> str:
    """All of a file in one read: one str in memory at the peak, as before files were read lazily (not a list of
    pieces and their join)."""
    with _opened(t) as f:
        text = f.read()
        _Check(Path(t.path))(text)
    return text


@contextlib.contextmanager
def _opened(t: Text):
    """t's file open as text (`_open`), its read errors one line naming it; refused where it changed since
    load_texts saw it, checked when opened and again when read to the end: the tokens and the sha256 of one text."""
    path = Path(t.path)
    with _reading(path):
        f = _open(path)
    with f, _reading(path):
        _check_unchanged(t)
        yield f
    _check_unchanged(t)


class _reading:
    """Read errors as one line naming the file (a cut or damaged .gz: EOFError is no OSError)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, EOFError | zlib.error | gzip.BadGzipFile):
            raise ClakitError(
                f"cannot read text file {self.path}: the .gz file is truncated or damaged ({e}); re-create it"
            ) from None
        if isinstance(e, OSError):
            raise ClakitError(f"cannot read text file {self.path}: {e.strerror or e}") from None
        return False


def _check_unchanged(t: Text) -> None:
    if t._stamp is not None and _stamp(Path(t.path)) != t._stamp:
        raise ClakitError(
            f"text file {t.path} changed while clakit was reading it (its size or modification time differ from "
            "when it was first read): the tokens and the record's sha256 would not be of one text; let whatever "
            "writes it finish (or copy it) and run again"
        )


class _Check:
    """Refuses binary data as it is read: a NUL, or more than MAX_UNDECODABLE undecodable bytes so far."""

    def __init__(self, path: Path):
        self.path, self.chars, self.bad, self.undecodable = path, 0, 0, None

    def __call__(self, piece: str) -> None:
        self.chars, self.bad = self.chars + len(piece), self.bad + piece.count("\ufffd")
        if "\x00" in piece or self.bad > MAX_UNDECODABLE * self.chars or (self.bad and self._undecodable()):
            raise ClakitError(self._why(piece))

    def _undecodable(self) -> bool:
        """Whether the file's start holds bytes UTF-8 cannot decode (not U+FFFD written in the text itself): a Latin-1
        file with a few accents was read with U+FFFD for them, its perplexity, bytes and sha256 those of another
        text, and nothing said so. Checked once, on the first U+FFFD."""
        if self.undecodable is None:
            head = _head_bytes(self.path)
            self.undecodable = head is not None and not _decodes(head)
        return self.undecodable

    def _why(self, piece: str) -> str:
        """Why the text is refused, and the fix: "not UTF-8 (binary data?)" sent the owner of UTF-8 text with a stray
        NUL, or of Latin-1 text (accents, no control bytes), looking for a problem the file does not have."""
        if _utf16(self.path):
            return f"{self.path} is UTF-16 text, not UTF-8; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"
        if "\x00" in piece and (CONTROL.search(piece) or self.bad):  # NULs among other binary bytes: not text
            return f"{self.path} is not UTF-8 text (binary data?); give text files (.txt, .md, .txt.gz)"
        if "\x00" in piece:
            return (f"{self.path} holds NUL bytes, which text does not (binary data?); give text files (.txt, .md, "
                    ".txt.gz), or remove the NULs: tr -d '\\000' < in.txt > out.txt")  # fmt: skip
        head = _head_bytes(self.path)
        if head is not None and _decodes(head):  # valid UTF-8 holding U+FFFD itself: iconv would garble it
            return (f"{self.path} holds {self.bad} U+FFFD replacement characters in its first {self.chars}: text "
                    "already damaged by an earlier decoding; give the original text")  # fmt: skip
        stray, mixed, first = _stray_bytes(head) if head is not None else ([], False, None)
        if mixed and not CONTROL.search(piece):  # UTF-8 with a few bytes of another encoding: iconv -f LATIN1 would
            return (f"{self.path} is UTF-8 text holding bytes UTF-8 cannot decode ({self.bad} in its first "  # garble
                    f"{self.chars} characters, the first at byte {first}): mixed encodings; fix those bytes, or drop "
                    "them: iconv -c -f UTF-8 -t UTF-8")  # fmt: skip
        if not CONTROL.search(piece):  # undecodable bytes in plain text: an 8-bit encoding
            cp1252 = any(0x80 <= b <= 0x9F for b in stray)  # Windows-1252's quotes and dashes (not UTF-8's own bytes)
            kind, code = ("Windows-1252", "WINDOWS-1252") if cp1252 else ("Latin-1 or Windows-1252", "LATIN1")
            return (f"{self.path} is not UTF-8: {self.bad} of its first {self.chars} characters are bytes UTF-8 "
                    f"cannot decode, as {kind} text has; convert it: iconv -f {code} -t UTF-8")  # fmt: skip
        return f"{self.path} is not UTF-8 text (binary data?); give text files (.txt, .md, .txt.gz)"


def _head_bytes(path, size: int = 1 << 20) -> bytes | None:
    """The first `size` bytes of a refused plain file, to tell its encoding (None for a .gz or an unreadable one)."""
    try:
        with open(path, "rb") as f:  # a .txt.gz: its own bytes say nothing of the text's encoding
            return None if str(path).endswith(".gz") else f.read(size)
    except OSError:
        return None


def _stray_bytes(data: bytes) -> tuple[list[int], bool, int | None]:
    """(the bytes UTF-8 cannot decode in `data`, whether it also holds valid multi-byte UTF-8 characters, the byte
    offset of the first undecodable one): a UTF-8 text with a few bytes of another encoding in it is not Latin-1
    text, and converting it from Latin-1 garbles every character it already holds right."""
    text = data.decode("utf-8", "surrogateescape")
    stray = [ord(c) - 0xDC00 for c in text if "\udc80" <= c <= "\udcff"]
    # more valid multi-byte characters than stray bytes: 8-bit text forms one by chance (Windows-1252 "ß…" is the
    # bytes DF 85, valid UTF-8), and iconv -c would then drop every accent of a Latin-1 text
    mixed = sum("\x7f" < c < "\udc80" or c > "\udcff" for c in text) > len(stray)
    try:
        data.decode("utf-8")
        first = None
    except UnicodeDecodeError as e:
        first = e.start
    return stray, mixed, first


def _decodes(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 (a character cut at its end aside): then its U+FFFD are in the text itself."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(data) - 3  # cut mid-character at the end of the head only
    return True


def _utf16(path: Path) -> bool:
    """Whether a refused file starts with a UTF-16 byte-order mark: Windows tools write text so (PowerShell's `>`,
    Notepad's "Unicode"), and "binary data?" sent its owner looking for a problem the file does not have."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    except (OSError, EOFError, zlib.error):
        return False


def _folder_files(path: Path) -> list[Path]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.name.endswith((".txt", ".txt.gz")) and not _hidden(p.relative_to(path))
    )
    if not files:
        raise ClakitError(f"folder {path} holds no .txt files; give text files or a folder of .txt files")
    for p in files:  # each is recorded (provenance, README.md: UTF-8 files), as a path given by hand is (`expand`)
        check_utf8(p, f"text file in {path}:")
    return files


def _hidden(relative: Path) -> bool:
    """A hidden file, or one below a hidden folder (a notebook's `.ipynb_checkpoints/x-checkpoint.txt` is a copy of
    x.txt): left out, as text tools do."""
    return any(part.startswith(".") for part in relative.parts)


def datasets_spec(spec: str, what: str = "text data") -> tuple[str, str | None, str]:
    """(name, config or None, split: "test" when none is named) of a datasets spec NAME[:CONFIG[:SPLIT]]: so `d`,
    `d::test` and `d::` are one text. Refused in one line where it is none (`:::`, `:cfg`, a 4th part that was
    dropped): datasets' own error was "list index out of range", read as being offline."""
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise ClakitError(
            f"{what} {spec!r} is neither a file or folder nor a datasets spec NAME[:CONFIG[:SPLIT]]; give text "
            "files, a folder of .txt or NAME:CONFIG:SPLIT"
        )
    parts += [""] * (3 - len(parts))
    return parts[0], parts[1] or None, parts[2] or "test"


def _load_datasets_spec(spec: str, what: str) -> Text:
    name, config, split = datasets_spec(spec, what)
    try:
        import datasets
    except ImportError:
        raise ClakitError(
            f"{spec!r} is not a file or folder, and reading it as a datasets spec needs `pip install datasets`"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all user-facing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClakitError(f"cannot load dataset {spec!r} ({first}); give local text files when offline") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return Text(spec, "\n".join(ds[column]))


def is_datasets_spec(spec: str) -> bool:
    """Whether a spec that names no existing file or folder is read as a datasets spec (NAME:CONFIG:SPLIT, or a bare
    name) rather than refused as a missing path (one with a `/` or a suffix and no `:`)."""
    return ":" in spec or ("/" not in spec and not Path(spec).suffix)


def load_texts(specs: list[str] | str, what: str = "text data") -> list[Text]:
    """Every spec's texts; refuse missing paths, unreadable, binary and empty text with a message naming the spec
    and `what` gave it (a flag or recipe key: "--calib-data", "data.eval"); each file's start is read here, the rest
    when a reader gets to it."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ClakitError(f"no text data given ({what})")
    for spec in specs:
        check_text_spec(spec, what)
    check_each_once(specs, what)
    texts = []
    for spec in specs:
        path = expand(spec, what)
        if path.is_dir():
            texts.extend(Text.file(p) for p in _folder_files(path))
        elif path.is_file():
            texts.append(Text.file(path))
        elif path.exists():
            raise ClakitError(_not_a_file(spec, what))
        elif path.is_symlink():  # not NAME:CONFIG:SPLIT of the Hub: a local link whose target is missing
            raise ClakitError(
                f"{what} {spec!r} is a link that leads to nothing (its target is missing, or links loop); fix the link"
            )
        elif is_datasets_spec(spec):
            texts.append(_load_datasets_spec(spec, what))
        else:
            raise ClakitError(
                f"{what} {spec!r} does not exist; give a text file, a folder of .txt or NAME:CONFIG:SPLIT"
            )
    for t in texts:
        if not any(p.strip() for p in t.pieces()):  # stops at the first piece with text in it
            raise ClakitError(f"{what} {t.name!r} is empty (or only whitespace); remove it or give it text")
    return texts


def check_text_spec(spec: str, where: str) -> None:
    """An empty (or blank) text spec is refused: Path("") is ".", so it read the current folder's files (a shell's
    log became training or held-out text)."""
    if not str(spec).strip():
        raise ClakitError(
            f"{where} has an empty name ({spec!r}), which would read the current folder; give a text file, a folder "
            "of .txt or NAME:CONFIG:SPLIT"
        )


def local_path(spec: str, what: str = "text data") -> Path | None:
    """The local file or folder a text spec names (resolved), or None for a datasets spec (NAME:CONFIG:SPLIT), as
    load_texts reads them: a spec that exists is a path, else is_datasets_spec decides (a missing path is refused
    when the text is read)."""
    path = expand(spec, what)
    if path.exists():
        return path.resolve()
    # missing, refused when read; a loop of links cannot be resolved (RuntimeError before Python 3.13)
    return None if is_datasets_spec(spec) and not path.is_symlink() else path.absolute()


def holds(outer: str, inner: str) -> bool:
    """Whether text spec `outer` reads all of `inner`'s text: the same spec, local paths that are the same file or
    folder (a symlink, `./a.txt`) or `inner` inside `outer` where that folder reads it (its non-hidden .txt,
    recursively: `_reading_folders`), or two datasets specs of one split (`d:c` is `d:c:test`)."""
    if outer == inner:
        return True
    po, pi = local_path(outer), local_path(inner)
    if po is None and pi is None:
        return datasets_spec(outer) == datasets_spec(inner)
    return po is not None and pi is not None and (po == pi or po in _reading_folders(pi))


def same_spec_text(a: str, b: str) -> bool:
    """Whether text specs `a` and `b` read the same text (or one holds the other's): `holds` either way."""
    return holds(a, b) or holds(b, a)


def check_each_once(specs: list[str], what: str) -> None:
    """A text named twice (the same file twice, a folder and a file in it) is read twice: calibration fitted on it
    twice over, held-out numbers weighting it double, training on it twice as often. Refused by spec, before any
    text is read; two different files with the same content (in a user's corpus folder) are the user's data. Each
    path is resolved once and looked up with its parents: `--data *.txt` may name thousands of files."""
    keys = [local_path(spec, what) or datasets_spec(spec, what) for spec in specs]
    keys = [(i, k) if isinstance(k, Path) and not k.exists() else k for i, k in enumerate(keys)]  # refused as missing
    first: dict = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    for i, key in enumerate(keys):
        above = [key, *_reading_folders(key)] if isinstance(key, Path) else [key]
        j = next((first[k] for k in above if first.get(k, i) != i), None)  # the same text, or a folder holding it
        if j is not None:
            earlier, later = sorted((i, j))
            raise ClakitError(
                f"{what} names the same text twice ({specs[earlier]} and {specs[later]}); list each file or folder "
                "once"
            )


def _reading_folders(path: Path) -> list[Path]:
    """The folders above `path` whose text would include it (`_folder_files`): none for a file a folder does not read
    (README.md, notes.csv) or one below a hidden folder of it (`corpus/.drafts/x.txt`), given beside that folder."""
    if not path.is_dir() and not path.name.endswith((".txt", ".txt.gz")):
        return []
    return [p for p in path.parents if not _hidden(path.relative_to(p))]


def _not_a_file(spec: str, what: str = "text data") -> str:
    """A pipe or device was called missing ("does not exist"): clakit reads text from files (a stream could be read
    only once, and is not recorded). `-` is refused by paths.expand."""
    return (
        f"{what} {spec!r} is not a regular file (a pipe, device or socket); clakit reads no streams: save the "
        "text to a file and give its path"
    )


def join_texts(texts: list[Text]) -> str:
    """One string for tokenisation: documents separated by a blank line. Reads them all: a reader with a budget
    takes `head`, one that streams `stream`."""
    return SEPARATOR.join(t.text for t in texts)


def stream(texts: list[Text], size: int = READ_CHARS) -> Iterator[str]:
    """join_texts(texts) in pieces of at most `size` characters, read as they are taken."""
    for i, t in enumerate(texts):
        if i:
            yield SEPARATOR
        yield from t.pieces(size)


def head(texts: list[Text], chars: int) -> str:
    """join_texts(texts)[:chars], reading no further than that."""
    return take(stream(texts, min(READ_CHARS, max(chars, 1))), chars)


def spread(texts: list[Text], n: int, chars: int) -> list[str]:
    """`n` spans of join_texts(texts), each of up to `chars` characters, starting evenly over the whole text (span i
    at i/n of it), each at the first line start after that point when there is one in reach; only the spans are
    read. Positions count bytes in a plain file (seeked to), characters elsewhere (a .gz is read once, from its
    start, for all of its spans)."""
    sizes = [_units(t) for t in texts]
    starts = [_locate(sizes, i * sum(sizes) // n) for i in range(n)]
    gathered = _gathered(texts, starts, 2 * chars)
    out = []
    for k, at in starts:
        span = gathered[k, at] if (k, at) in gathered else take(_span_pieces(texts, k, at, 2 * chars), 2 * chars)
        line = span.find("\n", 0, chars) if (k, at) != (0, 0) else -1
        out.append(span[line + 1 : line + 1 + chars])
    return out


def _gathered(texts: list[Text], starts: list[tuple[int, int]], length: int) -> dict[tuple[int, int], str]:
    """The spans at `starts` inside texts that can only be read from their start (a .gz, a part of a file), each
    text read once for all of its spans; a span that its text ends first goes on into the texts after it."""
    out = {}
    for k, t in enumerate(texts):
        offsets = sorted({at for j, at in starts if j == k and at > 0})
        if t._text is not None or _seekable(t) or not offsets:
            continue
        for at, span in _one_pass(t, offsets, length).items():
            out[k, at] = span + take(_after(texts, k), length - len(span)) if len(span) < length else span
    return out


def _one_pass(t: Text, offsets: list[int], length: int) -> dict[int, str]:
    """{offset: up to `length` characters of t from it}, t read once from its start up to the last span's end."""
    spans, need, at = {o: [] for o in offsets}, dict.fromkeys(offsets, length), 0
    for piece in t.pieces():
        for o in offsets:
            if need[o] and o < at + len(piece):
                got = piece[max(o - at, 0) :][: need[o]]
                spans[o].append(got)
                need[o] -= len(got)
        at += len(piece)
        if at >= offsets[-1] and not any(need.values()):
            break
    return {o: "".join(v) for o, v in spans.items()}


def _units(t: Text) -> int:
    return t._stamp[0] if _seekable(t) else t.chars()


def _seekable(t: Text) -> bool:
    """A whole plain file: a byte offset can be seeked to (a .gz, or a part of a file, is read up to it)."""
    return t._text is None and t.start == 0 and t.stop is None and Path(t.path).suffix != ".gz"


def _locate(sizes: list[int], position: int) -> tuple[int, int]:
    """(text index, offset in it) of a position counted over all texts."""
    for k, size in enumerate(sizes):
        if position < size or k == len(sizes) - 1:
            return k, min(position, size)
        position -= size
    return 0, 0


def _span_pieces(texts: list[Text], k: int, at: int, size: int) -> Iterator[str]:
    """join_texts(texts) from offset `at` of texts[k] on (generators: nothing is read before it is taken)."""
    t = texts[k]
    yield from (t.pieces(size) if at == 0 else _seek_pieces(t, at, size) if _seekable(t) else t.part(at).pieces(size))
    yield from _after(texts, k, size)


def _after(texts: list[Text], k: int, size: int = READ_CHARS) -> Iterator[str]:
    """join_texts(texts) after texts[k] (its separator first)."""
    for later in texts[k + 1 :]:
        yield SEPARATOR
        yield from later.pieces(size)


def _seek_pieces(t: Text, offset: int, size: int) -> Iterator[str]:
    """A plain file's text from byte `offset` (moved past a character's continuation bytes), decoded, checked and
    its line ends read as `pieces` reads them."""
    path = Path(t.path)
    with _reading(path):
        raw = open(path, "rb")  # noqa: SIM115 (closed below, with its reader)
    with raw, _reading(path):
        _check_unchanged(t)
        raw.seek(offset)
        lead = raw.read(3)
        raw.seek(offset + len(lead) - len(lead.lstrip(bytes(range(0x80, 0xC0)))))
        f, check = io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), _Check(path)
        while piece := f.read(size):
            check(piece)
            yield piece


def take(pieces: Iterator[str], chars: int) -> str:
    """The first `chars` characters of the pieces joined, taking no piece after them."""
    out, n = [], 0
    for piece in pieces:
        out.append(piece[: chars - n])
        n += len(out[-1])
        if n >= chars:
            break
    return "".join(out)


def texts_sha256(texts: list[Text]) -> str:
    """provenance.text_sha256(join_texts(texts)), streamed: the same hex digest in bounded memory."""
    digest = hashlib.sha256()
    for piece in stream(texts):
        digest.update(piece.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


# --- the same text under two names: held-out text that is not held out ---------------------------------------------


def text_digest(text: Text) -> str:
    """text_sha256(text.text.strip()), read piece by piece: a copy with other leading/trailing blank lines is the
    same text, and a large file is never held whole."""
    digest, pending = hashlib.sha256(), ""
    for piece in _lstripped(text.pieces()):
        body = piece.rstrip()
        if body:  # whitespace before it is inside the text after all
            digest.update((pending + body).encode("utf-8", "surrogatepass"))
        pending = piece[len(body) :] if body else pending + piece
    return digest.hexdigest()


_KEY_CHARS = 1 << 16  # characters of a text's start compared before any text is digested whole


def text_key(text: Text) -> str:
    """sha256 of the first _KEY_CHARS characters of text.strip() (all of it when shorter), trailing whitespace
    dropped: equal for texts whose strip() is equal, so only texts with equal keys are read whole (`text_digest`);
    a digest, so the keys of a folder of thousands of files are kept, not their first 64K characters each."""
    start = take(_lstripped(text.pieces(_KEY_CHARS)), _KEY_CHARS).rstrip()
    return hashlib.sha256(start.encode("utf-8", "surrogatepass")).hexdigest()


def _lstripped(pieces):
    """The pieces of a text with the whitespace at its start left out (empty pieces too)."""
    started = False
    for piece in pieces:
        piece = piece if started else piece.lstrip()
        started = started or bool(piece)
        if piece:
            yield piece


def same_text(t: Text, among: list[tuple[str, Text]]) -> str | None:
    """The name of a text in `among` ((text_key, text) pairs) whose strip() equals t's, read whole only where their
    starts agree (a 30 GB data.train is not read through to compare it with a held-out file)."""
    key = text_key(t)
    return next((o.name for k, o in among if k == key and text_digest(o) == text_digest(t)), None)


def shared_text(texts: list[Text], among: list[Text]) -> tuple[Text, str] | None:
    """(the first of `texts` whose text is also one of `among`'s, that one's name), or None: held-out text that a
    fit also reads, by content (the same file, one inside a folder, a copy under another name)."""
    keyed = [(text_key(o), o) for o in among]
    for t in texts:
        same = same_text(t, keyed)
        if same is not None:
            return t, same
    return None


# near-copies: lines of at least LINE_CHARS characters (whitespace collapsed) are compared by hash; shorter ones
# (headings, "Amen.") recur in unrelated texts. Measured on Debian's common-licenses: GFDL-1.2 in GFDL-1.3 89% of its
# lines, LGPL-2 in LGPL-2.1 80%, GPL-2 in GPL-1 25%; the demo's held-out Jargon File in its train text 0.05%, the
# Bible's last fifth in its first four 0.05%.
LINE_CHARS = 40
NEAR_COPY = 0.5  # held-out text with at least half of its long lines in the fitted text is a near-copy
_NEAR_MIN_LINES = 8  # and at least this many: a held-out text of three long lines is not judged by one
NEAR_SCAN_CHARS = 2 << 30  # characters of the fitted text read for it: ~40 s at most
HELD_SCAN_CHARS = 64 << 20  # of the held-out text: more than any evaluation scores, its line hashes held in memory


@dataclass
class NearCopy:
    """Held-out text most of whose long lines are in the fitted text: how many of its lines are (`found` of
    `lines`), the held-out file holding most of them, and the fitted file most of those came from."""

    found: int
    lines: int
    worst: Text
    holder: str

    def text(self, group: str) -> str:
        # "lines": a line beyond LONG_LINE characters counts its sentences (_compared)
        return (f"{self.found:,} of its {self.lines:,} lines of {LINE_CHARS}+ characters are in {group}, most of "
                f"them from {self.holder} into {self.worst.name}")  # fmt: skip


def _line_hashes(t: Text, chars: int | None = None) -> Iterator[tuple[set[int], int]]:
    """(hash() of each long line, whitespace collapsed (a copy re-indented or with CRLF ends is the same), the
    characters read) per piece read (never the text whole), up to about `chars` characters (all of it: None).
    ~50 MB/s on this 2-core host (a set comprehension per piece; a generator per line was ~30)."""
    pending, read = "", 0
    for piece in t.pieces():
        *whole, pending = (pending + piece).split("\n")
        if len(pending) > LONG_LINE:  # a line not ended yet: its sentences so far, not a growing copy of it
            *more, pending = _sentences(pending)
            whole += more
            if len(pending) > READ_CHARS:  # no sentence end in a megabyte: cut, memory stays bounded
                whole, pending = whole + [pending], ""
        yield _hashes(_compared(whole)), len(piece)
        read += len(piece)
        if chars is not None and read >= chars:
            return
    yield _hashes(_compared([pending])), 0


# A line longer than this (a text with no line breaks: one paragraph per line, a dump joined with spaces) is compared
# by its sentences: whole, it is one unit that a copy of half of it never matches, and read piece by piece it was
# copied once per piece (quadratic time, memory ~20x its size: 4 GB for a 200 MB line).
LONG_LINE = 4096
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(line: str) -> list[str]:
    return _SENTENCE_END.split(line)


def _compared(lines: list[str]) -> list[str]:
    """The units compared: each line, a line longer than LONG_LINE as its sentences."""
    return [unit for line in lines for unit in (_sentences(line) if len(line) > LONG_LINE else [line])]


def _hashes(lines: list[str]) -> set[int]:
    return {hash(c) for line in lines if len(line) >= LINE_CHARS and len(c := " ".join(line.split())) >= LINE_CHARS}


def _held_lines(held: list[Text]) -> list[set[int]]:
    """Each held-out text's long-line hashes, of their first HELD_SCAN_CHARS characters together."""
    out, budget = [], HELD_SCAN_CHARS
    for t in held:
        lines = set()
        for hashes, read in _line_hashes(t, budget) if budget > 0 else ():
            lines |= hashes
            budget -= read
        out.append(lines)
    return out


def _found_in(fitted: list[Text], union: set[int]) -> dict[int, str]:
    """Line hash -> the fitted text it was first found in, for the hashes of `union` the fitted texts hold (their
    first NEAR_SCAN_CHARS characters, one pass; stopped once every hash is found)."""
    seen, budget = {}, NEAR_SCAN_CHARS
    for f in fitted:
        for hashes, read in _line_hashes(f, budget):
            seen.update(dict.fromkeys(hashes.intersection(union).difference(seen), f.name))
            budget -= read
        if len(seen) == len(union) or budget <= 0:
            break
    return seen


def near_copy(held: list[Text], fitted: dict[str, list[Text]]) -> tuple[str, NearCopy] | None:
    """(the fitted group, what was found) when the held-out texts, taken together, have at least NEAR_COPY of their
    long lines in one group of fitted texts (`fitted`: group name -> texts), else None. Catches what the exact
    comparison (`shared_text`) cannot: a half of a training file, a file plus a line, a file re-indented. Judged on
    the held-out set as a whole: a small file of a licence header the fitted text also carries does not make a
    held-out folder of unseen text a near-copy. Nothing is read where no text is fitted."""
    groups = {group: texts for group, texts in fitted.items() if texts}
    if not groups or not held:
        return None
    wanted = _held_lines(held)
    union, total = set().union(*wanted), sum(map(len, wanted))
    for group, texts in groups.items():
        seen = _found_in(texts, union)
        found = [[seen[h] for h in lines if h in seen] for lines in wanted]
        count = sum(map(len, found))
        if count >= max(_NEAR_MIN_LINES, NEAR_COPY * total):
            worst = max(range(len(held)), key=lambda i: len(found[i]))
            return group, NearCopy(count, total, held[worst], Counter(found[worst]).most_common(1)[0][0])
    return None
