"""At size (break-it round 6): what a 70B run costs in time, memory and disk, before and during. Each test counts
the work done (reads, loads, bytes held) where a timing would be noise; the timings are in benchmarks/."""

import json
import shutil

import pytest
import torch
from test_uptrain_run import run_cli
from uptrain_fixtures import tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.uptrain import pipeline, student
from clakit.uptrain.recipe import load_recipe

# --- uptrain: the run's disk space, checked before any model loads ---------------------------------------------


def test_the_run_space_is_checked_before_any_model_loads(tiny_cla_checkpoint, corpus_dir, tmp_path, capsys,  # noqa: F811
                                                         monkeypatch):  # fmt: skip
    """check_run_space counted the loaded, trainable student, so a disk without room for the result and its
    checkpoints was refused only after the student and the teacher had loaded (at 70B each read is minutes; under
    FSDP the teacher's broadcast too). It counts the student's meta skeleton now, before either loads."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    monkeypatch.setattr(pipeline, "_load_student", lambda *a: pytest.fail("the student loaded before the check"))
    monkeypatch.setattr(pipeline, "_load_teacher", lambda *a: pytest.fail("the teacher loaded before the check"))
    code, err = run_cli(capsys, recipe)
    assert code == 2 and err.count("\n") == 0 and "not enough disk space" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", [{}, {"r": 0, "full_train": ["q_proj", "o_proj"]}, {"full_train": ["q_proj"]}])
def test_the_skeleton_counts_the_bytes_of_the_loaded_student(tokenizer, corpus_dir, tmp_path, tied, lora):
    """The meta skeleton's (result, checkpoint) bytes equal the loaded trainable student's: tied embeddings counted
    once, LoRA adapters and fully trained tensors (fp32) in the checkpoint, the result without the adapters."""
    from conftest import save_checkpoint, tiny_model

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    cla = cla_model_from(tiny_model("llama", tie_word_embeddings=tied), uniform_layout(4, 2), "mean")
    path = save_checkpoint(cla, tokenizer, tmp_path / "cla")
    raw = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(path)}, lora=lora)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    loaded = student.make_trainable(student.load_cla(path, torch.float32), recipe.lora)
    skeleton = pipeline.trainable_skeleton(path, recipe)
    assert all(p.is_meta for p in skeleton.parameters())
    for dtype in (torch.bfloat16, torch.float32):
        assert pipeline.run_bytes(skeleton, dtype) == pipeline.run_bytes(loaded, dtype)


def test_the_end_of_a_run_reads_the_conversion_record_once(tiny_cla_checkpoint, corpus_dir, tmp_path, capsys,  # noqa: F811
                                                           monkeypatch):  # fmt: skip
    """uptrain.json's origins and its resolved defaults each read the start checkpoint's clakit_convert.json (at
    70B it holds every candidate group's score): twice at the end, and they could disagree if it changed between.
    Once at the end now, both taken from that one read; at the start once for run.json and once for the held-out
    check (student.fitted_before: the conversion's calibration files)."""
    from clakit.uptrain import card

    start = tmp_path / "start"
    shutil.copytree(tiny_cla_checkpoint, start)
    (start / card.RECORD_FILE).write_text('{"settings": {"init": "mean"}}')  # read by both, whatever it holds
    from clakit.eval import lineage

    reads, real = [], card.read_record
    monkeypatch.setattr(card, "read_record", lambda path: reads.append(path) or real(path))
    monkeypatch.setattr(lineage, "record_or_none", card.read_record)  # fitted_on's reads (student.fitted_before)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(start)}))
    assert run_cli(capsys, recipe) == (0, "")
    assert [p for p in reads if p.name == card.RECORD_FILE] == [start / card.RECORD_FILE] * 3
    assert json.loads((out / "model" / card.PROVENANCE).read_text())["conversion"] == {"settings": {"init": "mean"}}


# --- convert: the first free-space check counts the calibration tokens the text gives ---------------------------


@pytest.fixture
def convert_src(tiny_llama_checkpoint, tmp_path):
    from convert_fixtures import copy_checkpoint

    return copy_checkpoint(tiny_llama_checkpoint, tmp_path / "src")


@pytest.mark.parametrize("layout", [["--layout", "auto"], ["--factor", "2"]])
def test_the_first_disk_check_counts_the_calibration_tokens_the_text_gives(convert_src, corpus_dir, tmp_path,
                                                                           capsys, monkeypatch, layout):  # fmt: skip
    """The check before the layout search and the fits priced the fits' scratch files (which grow with the
    calibration tokens) at the full --calib-tokens, though a text that holds fewer gives fewer: asked for far more
    tokens than the text holds, a disk with room for the conversion was refused before it started. It counts the
    tokens the text gave now: the same need as asking for exactly those tokens, and the conversion runs."""
    from convert_fixtures import run_cli as convert_cli

    from clakit import outputs

    checked, real = [], outputs.check_free_space
    monkeypatch.setattr(outputs, "check_free_space", lambda out, n, *a: checked.append(n) or real(out, n, *a))
    common = [*layout, "--init", "calibrated", "--calib-data", corpus_dir / "calib.txt", "--seq-len", "64",
              "--distill-steps", "0", "--quiet"]  # fmt: skip
    assert convert_cli(convert_src, tmp_path / "asked", *common, "--calib-tokens", "100000000") == 0
    record = json.loads((tmp_path / "asked" / "clakit_convert.json").read_text())
    given = record["settings"]["calib_tokens"]  # what the text held
    assert given < 100_000_000
    first_asked, checked[:] = checked[0], []
    assert convert_cli(convert_src, tmp_path / "exact", *common, "--calib-tokens", str(given)) == 0
    assert first_asked == checked[0], (first_asked, checked[0])
    assert capsys.readouterr().err == ""  # nothing refused, nothing said (--quiet)


# --- convert: the layout refinement's layer reads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def refine_case(tokenizer, tmp_path_factory):
    """An 8-layer Llama on which the refinement moves consumers (test_quality_calibrate's), saved, and score ids."""
    from conftest import make_text, save_checkpoint, tiny_model

    from clakit.convert.calibrate import calib_input_ids
    from clakit.corpus import Text

    path = save_checkpoint(tiny_model("llama", num_hidden_layers=8, seed=3), tokenizer, tmp_path_factory.mktemp("r"))
    ids = calib_input_ids(tokenizer, [Text("calib", make_text(3000, seed=11))], 1024, 64)[:4]
    return path, ids


def layerwise(folder):
    from transformers import AutoConfig

    from clakit.convert.checkpoint import SafetensorsCheckpoint
    from clakit.convert.layerwise import LayerwiseModel

    config = AutoConfig.from_pretrained(folder)
    return LayerwiseModel.from_checkpoint(config, SafetensorsCheckpoint(folder), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("start", [[0, 0, 0, 3, 3, 5, 5, 5], [0, 0, 2, 2, 4, 4, 6, 6]])
def test_the_refinement_reads_each_layer_once_per_consumer_and_move(refine_case, start):
    """refine_layout ran one whole-model forward per trial (every layer from the trial's start, plus every shared
    group's layers again for its means) and rebuilt its cache with another after each move: ~6 reads of each layer
    per consumer, ~15,000 reads of a 70B's 1.7 GB layers. Through a LayerwiseModel a consumer's trials now share one
    pass (each layer read once, the group means cached) and a move rebuilds the cache in one more; the layout and
    the moves are the in-memory search's (the per-trial forwards, unchanged)."""
    from transformers import AutoModelForCausalLM

    from clakit.convert import autolayout

    folder, ids = refine_case
    in_memory = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected, expected_moves = autolayout.refine_layout(in_memory, start, ids, progress=False)
    runner = layerwise(folder)
    with runner.offloaded() as model:
        autolayout.layer_inputs(model, ids, start)
        first, runner.reads = runner.reads, 0  # the refinement's own cache of layer inputs: these reads again
        layout, moves = autolayout.refine_layout(model, start, ids, progress=False)
    assert expected_moves and layout == expected
    assert [m | {"nll_gain": 0} for m in moves] == [m | {"nll_gain": 0} for m in expected_moves]
    assert [m["nll_gain"] for m in moves] == pytest.approx([m["nll_gain"] for m in expected_moves], abs=2e-6)
    consumers, moved = sum(p != c for c, p in enumerate(start)), len({m["layer"] for m in moves})
    assert runner.reads <= len(start) * consumers, (runner.reads, first, consumers, moved)  # HEAD: 138, 147


# --- uptrain: what a checkpoint save holds at once ----------------------------------------------------------------


def test_a_checkpoint_save_releases_the_trainable_tensors_before_gathering_the_optimizer(tmp_path, monkeypatch):
    """save_checkpoint gathered the whole trainable tensors and then AdamW's whole state before writing either:
    under FSDP both are copies on rank 0's host (at 70B, every attention projection trained in full: 48 GB beside
    96 GB). The trainable tensors are now written and released before the optimizer's state is gathered; the files
    are the same (a resume reads the same tensors and moments)."""
    import gc
    import weakref

    from safetensors.torch import load_file

    from clakit.uptrain import checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gathered, alive = [], []
    real_trainable, real_optimizer = checkpoint.trainable_state, checkpoint._optimizer_state

    def trainable(m):
        state = real_trainable(m)
        gathered.extend(weakref.ref(t) for t in state.values())
        return state

    def optim(m, o):
        gc.collect()
        alive.append(sum(ref() is not None for ref in gathered))
        return real_optimizer(m, o)

    monkeypatch.setattr(checkpoint, "trainable_state", trainable)
    monkeypatch.setattr(checkpoint, "_optimizer_state", optim)
    folder = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1})
    assert len(gathered) == 4 and alive == [0], alive  # none still held when the optimizer state is gathered
    saved = load_file(folder / "trainable.safetensors")
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters())
    moments = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(moments[n]["exp_avg"], optimizer.state[p]["exp_avg"]) for n, p in model.named_parameters())
