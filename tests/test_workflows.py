"""Round 7: chains of commands, and the state one command leaves for the next. A user converts, uptrains, uptrains
the result again, evaluates, reports, moves folders between steps, and points one command at another's output.
Each test follows the records across such a chain: an output written inside another output (which that output's
--overwrite then deleted unseen), the KV saving of a moved source read from another folder of the same name, the
lineage of a model uptrained twice, a run folder or a training checkpoint given where a model is wanted."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from bad_input import run_clakit
from conftest import save_checkpoint, tiny_model
from uptrain_fixtures import tiny_recipe, write_recipe

from clakit.uptrain import uptrain

EVAL_FLAGS = ("--seq-len", "32", "--max-tokens", "64", "--no-speed", "-q")


def _uptrain(root: Path, corpus_dir: Path, name: str, start: Path, steps: int) -> Path:
    """A tiny run from `start` (no distillation: no teacher needed); returns its run folder."""
    train = {"max_steps": steps, "save_steps": 1, "warmup_steps": 0}
    recipe = tiny_recipe(corpus_dir, root / name, model={"path": str(start)}, train=train)
    return uptrain(write_recipe(root / f"{name}.yaml", recipe), quiet=True).parent


@pytest.fixture(scope="module")
def chain(tiny_llama_checkpoint, corpus_dir, tmp_path_factory):
    """src -> `clakit convert` -> conv -> uptrain (3 steps) -> run1/model -> uptrain again (2 steps) -> run2/model."""
    root = tmp_path_factory.mktemp("chain")
    src = shutil.copytree(tiny_llama_checkpoint, root / "src")
    converted = run_clakit("convert", src, root / "conv", "-q")
    assert converted.code == 0, converted.err
    run1 = _uptrain(root, corpus_dir, "run1", root / "conv", 3)
    run2 = _uptrain(root, corpus_dir, "run2", run1 / "model", 2)
    return SimpleNamespace(root=root, src=src, conv=root / "conv", run1=run1, run2=run2, data=corpus_dir)


def _eval(model, out, data: Path, cwd=None):
    return run_clakit("eval", model, "-o", out, "--data", data / "heldout.txt", *EVAL_FLAGS, cwd=cwd)


def _refused(run, *expected: str) -> None:
    assert run.code == 2, (run.code, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.err, run.err
    for text in expected:
        assert text in lines[0], lines[0]


# --- 2. records read back after a move ----------------------------------------------------------------------------


def test_the_kv_saving_of_a_moved_source_is_not_measured_against_another_folder_of_its_name(
    tiny_llama_checkpoint, corpus_dir, tmp_path
):
    """`clakit convert base conv` in a/, then base moved away: eval of conv from b/, which holds another model named
    base (same layers, width, heads and vocabulary, 4 KV heads instead of 2), measured the saving against b/base,
    the relative spec read from the wrong working directory: 4.0 for a 2x layout. The recorded spec is read from
    the conversion's working directory: gone there, the saving is the layout's, layers / producers."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_llama_checkpoint, a / "base")
    assert run_clakit("convert", "base", "conv", "-q", cwd=a).code == 0
    (a / "base").rename(a / "moved")
    save_checkpoint(tiny_model("llama", num_key_value_heads=4), _tokenizer(a / "moved"), b / "base")
    ran = _eval(a / "conv", b / "r.json", corpus_dir, cwd=b)
    assert ran.code == 0, ran.err
    kv = json.loads((b / "r.json").read_text())["kv_cache"]
    layout = json.loads((a / "conv" / "config.json").read_text())["kv_source_layers"]
    expected = len(layout) / sum(i == s for i, s in enumerate(layout))  # layers / producers
    assert kv["saving_factor"] == pytest.approx(expected), kv
    # where the source is still where the conversion read it, it is the reference (the same number here)
    (a / "moved").rename(a / "base")
    assert _eval(a / "conv", b / "r.json", corpus_dir, cwd=b).code == 0
    assert json.loads((b / "r.json").read_text())["kv_cache"]["saving_factor"] == pytest.approx(expected)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
