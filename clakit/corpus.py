"""Text for calibration, evaluation and training: files, folders of .txt, or `datasets` specs.

A spec is one of
  * a path to a text file (`.txt`, `.md`, anything UTF-8; `.gz` is decompressed),
  * a path to a folder: every `*.txt` / `*.txt.gz` below it, sorted by name, except hidden files and folders
    (`.ipynb_checkpoints/`, `.git/`: editors' and tools' copies would count the same text twice),
  * a `datasets` spec `NAME[:CONFIG[:SPLIT]]`, e.g. `wikitext:wikitext-2-raw-v1:test` (needs `pip install datasets`
    and the Hub; the text column is `text`).
"""

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

from clakit.errors import ClakitError
from clakit.paths import expand

DEFAULT_ONLINE_EVAL = "wikitext:wikitext-2-raw-v1:test"


@dataclass(frozen=True)
class Text:
    name: str  # where it came from, recorded in reports
    text: str


# Share of undecodable bytes (U+FFFD after errors="replace") above which a file is binary, not text with a few
# stray bytes: a model shard or an archive given as text would otherwise be tokenised as noise.
MAX_UNDECODABLE = 0.01


def _read_file(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is no text; scored, it would make the same text
        # read as another (3 more bytes, other tokens, another sha256)
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as f:
            text = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a cut or damaged .gz: EOFError is no OSError
        raise ClakitError(
            f"cannot read text file {path}: the .gz file is truncated or damaged ({e}); re-create it"
        ) from None
    except OSError as e:
        raise ClakitError(f"cannot read text file {path}: {e.strerror or e}") from None
    if "\x00" in text or text.count("\ufffd") > MAX_UNDECODABLE * len(text):
        if _utf16(path, opener):
            raise ClakitError(f"{path} is UTF-16 text, not UTF-8; save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
        raise ClakitError(f"{path} is not UTF-8 text (binary data?); give text files (.txt, .md, .txt.gz)")
    return text


def _utf16(path: Path, opener) -> bool:
    """Whether a refused file starts with a UTF-16 byte-order mark: Windows tools write text so (PowerShell's `>`,
    Notepad's "Unicode"), and "binary data?" sent its owner looking for a problem the file does not have."""
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
    return files


def _hidden(relative: Path) -> bool:
    """A hidden file, or one below a hidden folder (a notebook's `.ipynb_checkpoints/x-checkpoint.txt` is a copy of
    x.txt): left out, as text tools do."""
    return any(part.startswith(".") for part in relative.parts)


def _load_datasets_spec(spec: str) -> Text:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "test")
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


def load_texts(specs: list[str] | str) -> list[Text]:
    """Read every spec; refuse missing paths and empty text with a message naming the spec."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ClakitError("no text data given")
    texts = []
    for spec in specs:
        path = expand(spec, "text data")
        if path.is_dir():
            texts.extend(Text(str(p), _read_file(p)) for p in _folder_files(path))
        elif path.is_file():
            texts.append(Text(str(path), _read_file(path)))
        elif path.exists():
            raise ClakitError(_not_a_file(spec))
        elif is_datasets_spec(spec):
            texts.append(_load_datasets_spec(spec))
        else:
            raise ClakitError(
                f"text data {spec!r} does not exist; give a text file, a folder of .txt or NAME:CONFIG:SPLIT"
            )
    for t in texts:
        if not t.text.strip():
            raise ClakitError(f"text data {t.name!r} is empty")
    return texts


def _not_a_file(spec: str) -> str:
    """A pipe or device was called missing ("does not exist"): clakit reads text from files (a stream could be read
    only once, and is not recorded). `-` is refused by paths.expand."""
    return (
        f"text data {spec!r} is not a regular file (a pipe, device or socket); clakit reads no streams: save the "
        "text to a file and give its path"
    )


def join_texts(texts: list[Text]) -> str:
    """One string for tokenisation: documents separated by a blank line."""
    return "\n\n".join(t.text for t in texts)
