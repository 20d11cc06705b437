"""Near-copy detection on texts without line breaks (one very long line)."""

import subprocess
import sys

from conftest import make_text

from clakit import corpus


def test_half_of_a_single_line_text_is_a_near_copy(tmp_path):
    fitted = tmp_path / "fit.txt"
    fitted.write_text(make_text(60000, 5).replace("\n", " "))
    held = tmp_path / "held.txt"
    held.write_text("Preface. " + fitted.read_text()[: fitted.stat().st_size // 2])
    found = corpus.near_copy([corpus.Text.file(held)], {"--calib-data": [corpus.Text.file(fitted)]})
    assert found is not None and found[0] == "--calib-data"


def test_unrelated_single_line_text_is_not(tmp_path):
    fitted = tmp_path / "fit.txt"
    fitted.write_text(make_text(60000, 5).replace("\n", " "))
    held = tmp_path / "held.txt"
    held.write_text(make_text(4000, 6))
    assert corpus.near_copy([corpus.Text.file(held)], {"x": [corpus.Text.file(fitted)]}) is None


def test_a_long_line_is_read_in_bounded_memory(tmp_path):
    """A 40 MB text without a line break: its unfinished line was copied once per 1 MB piece read (quadratic time,
    ~800 MB peak). Measured in a fresh process, whose peak is its own."""
    big = tmp_path / "big.txt"
    line = "the king said unto him and they were " * 30
    with open(big, "w") as f:
        for _ in range(40 * 1024 * 1024 // len(line)):
            f.write(line + " ")
    (tmp_path / "held.txt").write_text(make_text(4000, 6))
    script = (
        "import resource, sys\nfrom pathlib import Path\n"
        "from clakit import corpus\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "texts = [corpus.Text.file(Path(sys.argv[1]))], {'x': [corpus.Text.file(Path(sys.argv[2]))]}\n"
        "corpus.near_copy(*texts)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "held.txt"), str(big)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < 300 * 1024  # KB above the imports' peak: was ~800 MB for 40 MB
