"""Resume after torn and corrupt checkpoints, the original model found from any working directory, conversion
before training without a collective wait, launches that cannot work, and the token budget read lazily."""

import argparse
import dataclasses
import json
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_text, save_checkpoint, tiny_model
from test_uptrain_run import run_cli
from uptrain_fixtures import killed_at_step, tiny_cla_checkpoint, tiny_recipe, write_recipe  # noqa: F401

from clakit.corpus import Text
from clakit.errors import ClakitError, Terminated
from clakit.uptrain import pipeline, uptrain
from clakit.uptrain.packing import PackedData, build_data, split_tail
from clakit.uptrain.recipe import DataSection, ModelSection
from clakit.uptrain.student import original_source

# --- resume: torn and corrupt checkpoints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_run(tiny_cla_checkpoint, corpus_dir, tmp_path_factory):  # noqa: F811
    """A run killed after step 5 of 6: checkpoints step-000002 and step-000004, no result."""
    root = tmp_path_factory.mktemp("killed")
    recipe = tiny_recipe(corpus_dir, root / "run", model={"path": str(tiny_cla_checkpoint)})
    path = write_recipe(root / "r.yaml", recipe)
    killed_at_step(5, path)
    return root


def copy_run(killed_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the killed run whose recipe points at the copy."""
    run = tmp_path / "run"
    shutil.copytree(killed_run / "run", run)
    recipe = (killed_run / "r.yaml").read_text().replace(str(killed_run / "run"), str(run))
    (tmp_path / "r.yaml").write_text(recipe)
    return run, tmp_path / "r.yaml"


def test_resume_of_a_run_killed_after_publishing_its_model_writes_the_missing_report(
    tiny_cla_checkpoint, corpus_dir, tmp_path, monkeypatch  # noqa: F811
):
    """Killed right after model/ was published (before: eval/uptrained.json and the report came after it, so
    --resume found the run finished and both were never written; only the trained model in memory had the numbers)."""
    model = {"path": str(tiny_cla_checkpoint)}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model, train={"max_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)

    def killed(summary):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.card, "one_line", killed)
    with pytest.raises(KeyboardInterrupt):
        uptrain(path, quiet=True)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert pipeline.finished(run) and not (run / "report").exists()
    uptrain(path, resume=True, quiet=True)
    saved = json.loads((run / "model" / "uptrain.json").read_text())["heldout"]["uptrained"]
    scored = json.loads((run / "eval" / "uptrained.json").read_text())
    assert scored["perplexity"] == saved["perplexity"]
    assert (run / "report" / "report.md").is_file() and "uptrained" in (run / "report" / "report.md").read_text()


def test_a_torn_checkpoint_folder_is_ignored(killed_run, tmp_path):
    """kill -9 while saving step 6 leaves step-000006.tmp, even with its state.json: resume starts at step 4."""
    run, recipe = copy_run(killed_run, tmp_path)
    torn = run / "checkpoints" / "step-000006.tmp"
    shutil.copytree(run / "checkpoints" / "step-000004", torn)
    (torn / "state.json").write_text(json.dumps({"step": 6}))
    (torn / "trainable.safetensors").write_bytes(b"\0" * 10)
    assert pipeline.checkpoint.checkpoint_dirs(run)[-1].name == "step-000004"
    assert uptrain(recipe, resume=True, quiet=True) == run / "model"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [5, 6]


def test_the_next_save_removes_torn_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000002", "step-000004", "step-000006.tmp", "notes.tmp"):
        (root / name).mkdir(parents=True)
    for name in ("step-000002", "step-000004"):
        (root / name / "state.json").write_text("{}")
    pipeline.checkpoint.prune(tmp_path, 1)
    assert sorted(p.name for p in root.iterdir()) == ["notes.tmp", "step-000004"]


def checkpoint_folder(path: Path, step: int, payload: str) -> Path:
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    (path / "trainable.safetensors").write_text(payload)
    return path


def test_a_step_saved_again_replaces_the_earlier_folder(tmp_path):
    final = checkpoint_folder(tmp_path / "checkpoints" / "step-000004", 4, "before")
    tmp = checkpoint_folder(tmp_path / "checkpoints" / "step-000004.tmp", 4, "after")
    pipeline.checkpoint._complete(tmp, final, {"step": 4})
    assert (final / "trainable.safetensors").read_text() == "after"
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-000004"]


def test_a_failed_rename_keeps_the_step_saved_before(tmp_path, monkeypatch):
    final = checkpoint_folder(tmp_path / "checkpoints" / "step-000004", 4, "before")
    tmp = checkpoint_folder(tmp_path / "checkpoints" / "step-000004.tmp", 4, "after")
    rename = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="No space"):
        pipeline.checkpoint._complete(tmp, final, {"step": 4})
    assert (final / "trainable.safetensors").read_text() == "before"
    assert not final.with_name("step-000004.old").exists()


@pytest.mark.parametrize("signal", [KeyboardInterrupt, Terminated])
def test_an_interrupted_save_leaves_no_torn_folder(tmp_path, monkeypatch, signal):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (clakit's Terminated) while a checkpoint was written left
    step-N.tmp in the run until a later save after --resume removed it; the steps saved before stay."""
    before = checkpoint_folder(tmp_path / "checkpoints" / "step-000002", 2, "before")

    def interrupted(model, optimizer, tmp, held):
        (tmp / "trainable.safetensors").write_text("half")
        raise signal()

    monkeypatch.setattr(pipeline.checkpoint, "_write_whole", interrupted)
    with pytest.raises(signal):
        pipeline.checkpoint.save_checkpoint(tmp_path, 4, None, None, None, {"step": 4})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    assert (before / "trainable.safetensors").read_text() == "before"


def test_a_save_interrupted_between_its_renames_puts_the_earlier_step_back(tmp_path, monkeypatch):
    """A step saved again after a resume: Ctrl-C after step-N went aside to step-N.old and before step-N.tmp took its
    place removed the new folder and left the earlier one as step-N.old, which --resume does not see."""
    before = checkpoint_folder(tmp_path / "checkpoints" / "step-000004", 4, "before")
    rename = Path.rename

    def interrupted(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt
        return rename(self, target)

    def whole(model, optimizer, tmp, held):
        (tmp / "trainable.safetensors").write_text("after")

    monkeypatch.setattr(pipeline.checkpoint, "_write_whole", whole)
    monkeypatch.setattr(pipeline.checkpoint, "_optimizer_state", lambda *a: {}, raising=False)
    monkeypatch.setattr(Path, "rename", interrupted)
    monkeypatch.setattr(pipeline.checkpoint.torch, "save", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        pipeline.checkpoint.save_checkpoint(tmp_path, 4, None, None, SimpleNamespace(state_dict=dict), {"step": 4})
    assert [p.name for p in pipeline.checkpoint.checkpoint_dirs(tmp_path)] == ["step-000004"]
    assert (before / "trainable.safetensors").read_text() == "before"


def test_prune_puts_back_a_step_moved_aside_by_a_kill(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint_folder(root / "step-000002.old", 2, "only copy")  # killed between the two renames
    checkpoint_folder(root / "step-000004", 4, "new")
    checkpoint_folder(root / "step-000004.old", 4, "replaced")
    pipeline.checkpoint.prune(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    assert (root / "step-000002" / "trainable.safetensors").read_text() == "only copy"
    assert (root / "step-000004" / "trainable.safetensors").read_text() == "new"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def pickle_optimizer(path: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "extra": argparse.Namespace(x=1)}, path)  # refused by weights_only


CORRUPTIONS = [
    ("trainable.safetensors", truncate, "trainable.safetensors is unreadable"),
    ("trainable.safetensors", Path.unlink, "trainable.safetensors is missing"),
    ("state.json", lambda p: p.write_text("{not json"), "state.json is unreadable"),
    ("state.json", lambda p: p.write_text("[1, 2]"), "state.json is unreadable: no step number"),
    ("optimizer.pt", pickle_optimizer, "optimizer.pt is unreadable"),
    ("optimizer.pt", truncate, "optimizer.pt is unreadable"),
    ("scheduler.pt", truncate, "scheduler.pt is unreadable"),
]


@pytest.mark.parametrize(("name", "damage", "message"), CORRUPTIONS)
def test_a_corrupt_checkpoint_is_one_line_naming_it(killed_run, tmp_path, capsys, name, damage, message):
    run, recipe = copy_run(killed_run, tmp_path)
    last = run / "checkpoints" / "step-000004"
    damage(last / name)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, err = run_cli(capsys, recipe, "--resume")
    assert code == 2 and err.startswith("clakit: error: ") and "\n" not in err and "Traceback" not in err
    assert f"checkpoint {last} is corrupt" in err and message in err, err
    assert "--resume continues from step-000002" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written or removed


def test_a_corrupt_run_record_is_one_line(killed_run, tmp_path, capsys):
    run, recipe = copy_run(killed_run, tmp_path)
    (run / "run.json").write_text('{"fingerprint": ')
    code, err = run_cli(capsys, recipe, "--resume")
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert f"{run / 'run.json'}" in err and "unreadable" in err, err


def test_trained_tensors_load_strictly(tiny_cla_checkpoint):  # noqa: F811
    from fsdp_worker import student_model

    from clakit.uptrain import checkpoint

    model = student_model(tiny_cla_checkpoint)
    state = checkpoint.trainable_state(model)
    checkpoint.load_trainable(model, state, "ok")
    wrong = next(k for k in state if "lora_A" in k)
    with pytest.raises(ClakitError, match="size mismatch|shape"):
        checkpoint.load_trainable(model, state | {wrong: torch.zeros(3, 3)}, "a bad state")
    with pytest.raises(ClakitError, match=r"a bad state does not hold .*\(19 saved, 18 trainable; e.g. extra\)"):
        checkpoint.load_trainable(model, state | {"extra": torch.zeros(1)}, "a bad state")


# --- the original model: resolved once, wherever the run starts ----------------------------------------------------


def test_the_teacher_is_the_converted_models_source_not_a_same_named_folder_here(
    tokenizer, corpus_dir, tmp_path, monkeypatch
):
    from clakit.convert import convert

    first, other = tmp_path / "first", tmp_path / "other"
    save_checkpoint(tiny_model("llama", seed=0), tokenizer, first / "orig")
    save_checkpoint(tiny_model("llama", seed=1), tokenizer, other / "orig")  # same name, another model
    monkeypatch.chdir(first)
    converted = convert("orig", first / "cla", factor=2, quiet=True)  # the source given relative to `first`
    monkeypatch.chdir(other)
    assert original_source(ModelSection(path=str(converted))) == (str(first / "orig"), None)
    recipe = tiny_recipe(
        corpus_dir,
        tmp_path / "run",
        model={"path": str(converted)},
        distill={"weight": 0.5},
        train={"max_steps": 1, "warmup_steps": 0},
    )
    uptrain(write_recipe(tmp_path / "r.yaml", recipe), quiet=True)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["original"]["path"] == str(first / "orig")
    monkeypatch.chdir(tmp_path)  # the eval baseline is that same model too: its perplexity, not the other's
    original = json.loads((tmp_path / "run" / "eval" / "original.json").read_text())
    ppl = original["perplexity"]
    assert original["provenance"]["model_path"] == str(first / "orig")  # which original it scored (was null)
    from clakit.eval import evaluate
    from clakit.sources import load_model, resolve_source

    kwargs = {"tokenizer": tokenizer, "seq_len": 32, "max_tokens": 128, "batch_size": 4, "speed": False}
    kwargs |= {"quiet": True, "data": [str(corpus_dir / "heldout.txt")]}
    first_ppl = evaluate(load_model(resolve_source(str(first / "orig"))), **kwargs)["perplexity"]
    assert ppl == pytest.approx(first_ppl, rel=1e-5)


def test_a_recorded_teacher_that_moved_is_refused_naming_the_record_dry_run_too(tokenizer, corpus_dir, tmp_path):
    """The conversion's source moved after it was converted: --dry-run passed and the run said "model '/.../orig'
    does not exist: give a checkpoint folder", a path the user never typed; now both name the record and the fix."""
    from clakit.convert import convert

    converted = convert(save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "orig"), tmp_path / "cla",
                        factor=2, quiet=True)  # fmt: skip
    (tmp_path / "orig").rename(tmp_path / "orig_moved")
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model={"path": str(converted)}, distill={"weight": 0.5})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    needle = f"the original model {converted} was made from ({tmp_path / 'orig'}, as its clakit_convert.json records)"
    for dry_run in (True, False):
        with pytest.raises(ClakitError, match=re.escape(needle + " does not exist here (moved, or made on another")):
            uptrain(path, dry_run=dry_run, quiet=True)
    assert not (tmp_path / "run").exists()
    uptrain(path, [f"model.original={tmp_path / 'orig_moved'}"], dry_run=True, quiet=True)  # the fix it names


def test_held_out_text_is_none_the_start_checkpoint_was_fitted_on_before(tokenizer, corpus_dir, tmp_path):
    """model.path's records name what it was fitted on: its conversion's calibration text (a copy under another
    name, relative to the folder convert ran in) and an earlier uptraining's training text. Given as data.eval, or
    cut as the held-out tail, its "held-out" numbers were accepted (model.convert refused the same text)."""
    from clakit.convert import convert

    shutil.copy(corpus_dir / "calib.txt", tmp_path / "fit.txt")
    source = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "orig")
    cla = convert(source, tmp_path / "cla", factor=2, init="calibrated", calib_data=[str(tmp_path / "fit.txt")],
                  calib_tokens=256, seq_len=32, quiet=True)  # fmt: skip
    needle = "holds the same text as text model.path was fitted on before " + str(tmp_path / "fit.txt")

    def run(name, **data):
        train = {"max_steps": 1, "warmup_steps": 0}
        recipe = tiny_recipe(corpus_dir, tmp_path / name, model={"path": str(cla)}, data=data, train=train)
        return uptrain(write_recipe(tmp_path / f"{name}.yaml", recipe), quiet=True)

    with pytest.raises(ClakitError, match=re.escape(needle)):
        run("r1", eval=[str(corpus_dir / "calib.txt")])
    with pytest.raises(ClakitError, match=re.escape("is cut from " + str(corpus_dir / "calib.txt"))):
        run("r2", train=[str(corpus_dir / "calib.txt")], eval=None)
    first = run("r3")  # trained on train.txt, held out heldout.txt
    cla = first  # an uptrained model: its own training text and its conversion's calibration, down the chain
    trained = "model.path was fitted on before " + str(corpus_dir / "train.txt")
    with pytest.raises(ClakitError, match=re.escape(trained)):
        run("r4", train=[str(tmp_path / "fit.txt")], eval=[str(corpus_dir / "train.txt")])
    with pytest.raises(ClakitError, match=re.escape(needle)):
        run("r5", eval=[str(tmp_path / "fit.txt")])
    # an earlier run that held out its tail: its training text is still no data.eval (it trained on most of it)
    (tmp_path / "more.txt").write_text(make_text(4000, seed=9))
    cla = run("r6", train=[str(tmp_path / "more.txt")], eval=None)
    with pytest.raises(ClakitError, match=re.escape("model.path was fitted on before " + str(tmp_path / "more"))):
        run("r7", eval=[str(tmp_path / "more.txt")])
    assert run("r8", train=[str(tmp_path / "more.txt")], eval=None).is_dir()  # the same tail held out again
    # a recorded file emptied or made binary since, which the run never reads, is no reason to refuse it
    (tmp_path / "fit.txt").write_bytes(b"\x00\xff" * 100)
    assert run("r9", eval=[str(corpus_dir / "heldout.txt")]).is_dir()


def test_without_distillation_a_hub_id_or_a_moved_recorded_original_is_best_effort(
    tiny_cla_checkpoint,  # noqa: F811
    corpus_dir,
    tmp_path,
    monkeypatch,
):
    """Only a local model.original that is not there is refused (tests/test_bad_input_values.py): a Hub id stays
    accepted offline, and a conversion record naming a moved source just loses the "original" report."""
    from clakit.uptrain.recipe import load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = {"path": str(tiny_cla_checkpoint), "original": "some-org/some-model"}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model)))
    assert pipeline.check_teacher(recipe, tmp_path / "run", resume=False) is None
    moved = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, original=None))
    monkeypatch.setattr(pipeline.student, "original_source", lambda section: (str(tmp_path / "moved"), None))
    assert pipeline.check_teacher(moved, tmp_path / "run", resume=False) is None


# --- conversion before training: the other processes poll, they do not wait in a collective --------------------


def test_other_processes_wait_for_a_long_conversion_without_a_collective(tmp_path):
    converted, failed = tmp_path / "converted", tmp_path / "converted.failed"

    def publish():
        time.sleep(0.5)
        staging = tmp_path / ".staging"
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        staging.rename(converted)

    thread = threading.Thread(target=publish)
    thread.start()
    start = time.perf_counter()
    pipeline.wait_for_conversion(converted, failed, poll_s=0.05)
    thread.join()
    assert time.perf_counter() - start >= 0.45
    failed.write_text("ClakitError: out of memory")
    with pytest.raises(ClakitError, match="main process failed converting model.source .*out of memory"):
        pipeline.wait_for_conversion(tmp_path / "never", failed, poll_s=0.05)
    with pytest.raises(ClakitError, match="its run folder is gone"):
        pipeline.wait_for_conversion(tmp_path / "removed" / "converted", tmp_path / "removed" / "x.failed", 0.05)


# --- launches that cannot work --------------------------------------------------------------------------------------


def test_fsdp1_without_use_orig_params_is_refused():
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def acc(version, orig):  # accelerate's own plugin, as `accelerate launch --use_fsdp` builds it from its flags
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, use_orig_params=orig)
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))

    with pytest.raises(ClakitError, match="fsdp_use_orig_params: true"):
        pipeline.check_fsdp(acc(1, False))
    pipeline.check_fsdp(acc(1, True))
    pipeline.check_fsdp(acc(2, None))  # FSDP2 keeps the original parameters
    pipeline.check_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, state=SimpleNamespace()))


@pytest.mark.parametrize(
    ("fsdp", "version", "refused"), [(2, "2.8.0", True), (1, "2.6.0+cu124", True), (1, "2.8.0", False)]
)
def test_fsdp_on_a_torch_that_failed_or_trained_other_weights_is_refused(fsdp, version, refused, monkeypatch):
    """torch 2.6 (clakit's floor) failed under FSDP on CPU processes, and 2.7-2.8 trained other weights under FSDP2
    on 2 CPU processes than on one (helper A's measurement, docs/install.md): refused in one line before any work
    (before: trained); FSDP1 on 2.7-2.8 and any FSDP on a 2.9 nightly run. On GPUs nothing was measured below 2.13
    (30f4e60 refused them too, and Stream.record_event is absent on the CPU only): not refused."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp, use_orig_params=True)
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin),
                          device=torch.device("cpu"))  # fmt: skip
    monkeypatch.setattr(torch, "__version__", version)
    if refused:
        need = rf"FSDP{fsdp} on CPU processes needs torch>=2\.\d \(found {re.escape(version)}"
        with pytest.raises(ClakitError, match=need):
            pipeline.check_fsdp(acc)
    else:
        pipeline.check_fsdp(acc)
    pipeline.check_fsdp(SimpleNamespace(**vars(acc) | {"device": torch.device("cuda", 0)}))  # unmeasured there
    monkeypatch.setattr(torch, "__version__", "2.9.0.dev20250901+cpu")
    pipeline.check_fsdp(acc)


def test_more_processes_than_blocks_is_refused():
    data = PackedData(torch.zeros(3, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long), [], [])
    pipeline.check_launch(data, 2)
    with pytest.raises(ClakitError, match="held-out data has only 2 blocks"):
        pipeline.check_launch(data, 3)
    with pytest.raises(ClakitError, match="train data has only 3 blocks of data.seq_len=8; launch at most 3"):
        pipeline.check_launch(data, 4)


# --- the token budget reads only what it needs ---------------------------------------------------------------------


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


def test_a_token_budget_without_held_out_data_does_not_tokenise_the_whole_text(tokenizer, tmp_path):
    from conftest import make_text

    text = make_text(400_000, 5)  # ~2.3 MB
    (tmp_path / "big.txt").write_text(text)
    counting = CountingTokenizer(tokenizer)
    data = build_data(DataSection(train=[str(tmp_path / "big.txt")], seq_len=32, eval_max_tokens=256), counting, 2048)
    assert counting.chars < 0.05 * len(text)  # the budget's share of the head and the held-out cap of the tail
    assert data.train.numel() >= 2048 and data.eval.shape == (8, 32)
    assert data.eval_sources == ["last 0.05 of data.train"]
    held = tokenizer.decode(data.eval[0])
    assert held in text and text.index(held) > 0.9 * len(text)  # the held-out blocks come from the tail


def test_a_token_budget_reads_every_train_file_in_proportion(tokenizer, tmp_path):
    """Two train files, a budget far below either: both are trained on, ~1:3 like their sizes (a head-read stream
    would fill the budget from the first file alone)."""
    from conftest import make_text

    small, big = make_text(100_000, 7), make_text(300_000, 8)
    (tmp_path / "a.txt").write_text(small)
    (tmp_path / "b.txt").write_text(big)
    (tmp_path / "held.txt").write_text(make_text(2_000, 9))
    counting = CountingTokenizer(tokenizer)
    section = DataSection(train=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], eval=[str(tmp_path / "held.txt")],
                          seq_len=32, eval_max_tokens=256)
    data = build_data(section, counting, 4096)
    assert counting.chars < 0.1 * (len(small) + len(big))  # still lazy
    decoded = [tokenizer.decode(b[4:-4]).strip() for b in data.train]  # inner tokens: no cross-file block edges
    from_a = sum(d in small for d in decoded)
    from_b = sum(d in big for d in decoded)
    assert from_a + from_b >= len(decoded) - 2  # every block (but those spanning the join) is in one file
    assert from_a > 0 and 2 <= from_b / from_a <= 4.5


def test_each_budget_share_ends_with_eos(tokenizer):
    """A file cut short by its share of the budget still ends with EOS, so its text never runs straight into the
    next file's start inside one training block."""
    from conftest import make_text

    from clakit.uptrain.packing import tokenize_shares

    texts = [Text("a", make_text(50_000, 3)), Text("b", make_text(50_000, 4)), Text("c", "short tail\n")]
    ids = tokenize_shares(tokenizer, texts, 600)
    ends = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
    assert len(ends) == 3 and ends[-1] == ids.numel() - 1  # one per file: two cut short, one read whole
    first = tokenizer.decode(ids[: ends[0]]).strip()
    assert texts[0].text.startswith(first[:200]) and len(first) < len(texts[0].text) / 2


def test_split_tail_cuts_at_a_line_end_and_keeps_every_character():
    texts = [Text("a", "one\ntwo\n"), Text("b", "three\nfour\nfive\n")]
    head, tail = split_tail(texts, 0.5)
    assert "".join(t.text for t in head + tail) == "one\ntwo\nthree\nfour\nfive\n"
    assert [t.name for t in head] == ["a", "b"] and head[-1].text == "three\n" and tail[0].text == "four\nfive\n"
    assert split_tail([Text("a", "x" * 100)], 0.1) == ([Text("a", "x" * 90)], [Text("a", "x" * 10)])


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_state_of_a_model_with_tied_embeddings(tied):
    """SmolLM2 ties lm_head to the embedding: the frozen alias is not a trainable tensor (the CPU recipe's first
    checkpoint failed on it)."""
    from conftest import tiny_model

    from clakit.uptrain import checkpoint

    model = tiny_model(tie_word_embeddings=tied).requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    state = checkpoint.trainable_state(model)
    assert sorted(state) == ["model.layers.0.self_attn.q_proj.weight"]
    checkpoint.load_trainable(model, state, "ok")
    model.model.embed_tokens.weight.requires_grad_(True)  # a trainable tied embedding: both names stay one tensor
    assert "model.embed_tokens.weight" in checkpoint.trainable_state(model)


def test_copies_repeat_an_earlier_span_of_the_same_window():
    from clakit.copies import add_copies

    n, length, span = 40, 64, 8
    base = torch.arange(n * length).view(n, length)  # every token unique: a repeat can only be a copy
    out = add_copies(base.clone(), 0.25, span, seed=3)
    changed = [i for i in range(n) if not torch.equal(out[i], base[i])]
    assert len(changed) == 10  # round(0.25 * 40) rows, the others untouched
    for i in changed:
        assert torch.equal(out[i, : length - span], base[i, : length - span])  # only the tail is rewritten
        tail = out[i, length - span :]
        start = int(tail[0] - base[i, 0])
        assert 0 <= start <= length - 2 * span  # the source lies before the copy, not overlapping it
        assert torch.equal(tail, base[i, start : start + span])
    assert torch.equal(add_copies(base.clone(), 0.25, span, seed=3), out)  # a resumed run rebuilds the same data
    assert not torch.equal(add_copies(base.clone(), 0.25, span, seed=4), out)
    assert torch.equal(add_copies(base.clone(), 0.0, span), base)


def test_copies_reach_training_blocks_only(tokenizer, tmp_path):
    from conftest import make_text

    (tmp_path / "a.txt").write_text(make_text(40_000, 7))
    (tmp_path / "held.txt").write_text(make_text(4_000, 9))
    section = DataSection(train=[str(tmp_path / "a.txt")], eval=[str(tmp_path / "held.txt")], seq_len=64,
                          eval_max_tokens=512)
    plain = build_data(section, tokenizer, 4096)
    copied = build_data(dataclasses.replace(section, copy_fraction=1.0, copy_span=16), tokenizer, 4096, seed=1)
    assert torch.equal(copied.eval, plain.eval)
    assert torch.equal(copied.train[:, :48], plain.train[:, :48])
    for tail, row in zip(copied.train[:, 48:], plain.train, strict=True):  # each tail repeats its own window
        assert any(torch.equal(tail, row[s : s + 16]) for s in range(33))



def test_a_disk_without_room_for_the_result_and_its_checkpoints_is_refused_before_training(
    tiny_cla_checkpoint, corpus_dir, tmp_path, capsys, monkeypatch  # noqa: F811
):
    """Uptrain checked no free space: a disk too small for the merged model failed at its save, after the whole
    training (at 70B ~140 GB, hours in). The need (`run_bytes`: the result, the checkpoints kept) is checked before
    training, and bounds what a run writes: a real run's model/ and checkpoints are within it."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, out, model={"path": str(tiny_cla_checkpoint)}))
    asked, check = [], pipeline.outputs.check_free_space
    monkeypatch.setattr(pipeline.outputs, "check_free_space", lambda o, n, *a: asked.append(n) or check(o, n, *a))
    assert run_cli(capsys, recipe) == (0, "")
    weights = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    kept = [sum(f.stat().st_size for f in d.iterdir()) for d in (out / "checkpoints").iterdir()]
    assert weights + sum(kept) <= asked[-1] <= 1.5 * (weights + sum(kept)), (asked, weights, kept)

    fresh = tmp_path / "fresh"
    small = type("Usage", (), {"free": asked[-1] - 1})()
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: small)
    monkeypatch.setattr(pipeline.Trainer, "run", lambda self: pytest.fail("trained on a disk without room"))
    model = {"path": str(tiny_cla_checkpoint)}
    recipe = write_recipe(tmp_path / "r2.yaml", tiny_recipe(corpus_dir, fresh, model=model))
    code, err = run_cli(capsys, recipe)
    assert code == 2 and err.count("\n") == 0 and "not enough disk space" in err and "train.output_dir" in err, err
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_hub_original_is_recorded_by_the_commit_it_was_read_at():
    """run.json and uptrain.json recorded a Hub original's revision as asked ("main"): a later run from the model,
    its snapshot gone from the cache, read whatever main was then (another model) and distilled from it."""
    from clakit.sources import Source
    from clakit.uptrain.pipeline import _source_record

    snapshot = Path("/hf/hub/models--org--tiny/snapshots/1111aaaa")
    assert _source_record(Source("org/tiny", "dir", snapshot, "main"))["revision"] == "1111aaaa"
    assert _source_record(Source("/m/tiny", "dir", Path("/m/tiny")))["revision"] is None


def test_model_revision_with_a_local_source_goes_to_the_original_not_the_conversion(tmp_path, monkeypatch):
    """model.revision is documented as the Hub revision of model.source or model.original: with a local source and
    a Hub original it was copied into the conversion, which refused it ("--revision v2 selects a Hub revision, but
    ... is a local path"), after --dry-run had passed."""
    import clakit.convert
    from clakit.convert.config import ConvertConfig
    from clakit.uptrain.recipe import ModelSection
    from clakit.uptrain.student import convert_source

    asked = []
    monkeypatch.setattr(clakit.convert, "convert", lambda src, out, config, **kw: asked.append(config.revision))
    local = ModelSection(source=str(tmp_path), original="org/tiny", revision="v2", convert=ConvertConfig(factor=2))
    convert_source(local, tmp_path / "out")
    hub = ModelSection(source="org/tiny", revision="v2", convert=ConvertConfig(factor=2))
    convert_source(hub, tmp_path / "out")
    assert asked == [None, "v2"]


def test_a_record_naming_a_folder_of_calibration_text_counts_its_files(tokenizer, corpus_dir, tmp_path):
    """A conversion record whose settings.calib_data names a folder (written by hand, or by another tool): the folder
    was skipped (only files were looked for), so its text could be cut as the held-out tail, or given as data.eval,
    and read as held out."""
    import json

    from clakit.convert import convert

    (tmp_path / "fitdir").mkdir()
    shutil.copy(corpus_dir / "calib.txt", tmp_path / "fitdir" / "fit.txt")
    source = save_checkpoint(tiny_model("llama"), tokenizer, tmp_path / "orig")
    cla = convert(source, tmp_path / "cla", factor=2, init="calibrated", calib_data=[str(tmp_path / "fitdir")],
                  calib_tokens=256, seq_len=32, quiet=True)  # fmt: skip
    record = json.loads((cla / "clakit_convert.json").read_text())
    record["settings"]["calib_data"] = [str(tmp_path / "fitdir")]
    (cla / "clakit_convert.json").write_text(json.dumps(record))

    def run(name, **data):
        train = {"max_steps": 1, "warmup_steps": 0}
        recipe = tiny_recipe(corpus_dir, tmp_path / name, model={"path": str(cla)}, data=data, train=train)
        return uptrain(write_recipe(tmp_path / f"{name}.yaml", recipe), quiet=True)

    with pytest.raises(ClakitError, match=re.escape("model.path was fitted on before " + str(tmp_path / "fitdir"))):
        run("r1", eval=[str(corpus_dir / "calib.txt")])
    with pytest.raises(ClakitError, match=re.escape("is cut from " + str(corpus_dir / "calib.txt"))):
        run("r2", train=[str(corpus_dir / "calib.txt")], eval=None)


def test_an_older_clakits_positional_optimizer_state_resumes_by_name():
    """optimizer.pt before 12-02 was torch's own state dict, its tensors numbered in the order the optimizer got them
    (the trainable parameters in model.parameters() order); the resume of such a run was refused as 'corrupt ...
    (KeyError)' (helper 50o). The numbers are mapped to the names the distributed state-dict API loads by."""
    import torch
    from conftest import tiny_model
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from clakit.uptrain.checkpoint import _named_positional

    model = tiny_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "k_proj" in name)  # (hidden, hidden) and (kv heads x dim, hidden)
    trainable = [p for p in model.parameters() if p.requires_grad]
    old = torch.optim.AdamW(trainable, lr=1e-3)
    model(torch.arange(16)[None]).logits.sum().backward()
    old.step()
    positional = old.state_dict()  # {"state": {0: ..., 1: ...}, "param_groups": [{"params": [0, 1, ...]}]}
    new = torch.optim.AdamW(trainable, lr=1e-3)
    set_optimizer_state_dict(model, new, _named_positional(positional, model))
    named = get_optimizer_state_dict(model, new)
    for i, name in enumerate(n for n, p in model.named_parameters() if p.requires_grad):
        assert torch.equal(named["state"][name]["exp_avg"], positional["state"][i]["exp_avg"]), name
    assert _named_positional(named, model) is named  # a named state is left as it is
    swapped = {**positional, "state": {0: positional["state"][1], 1: positional["state"][0],
                                       **{i: v for i, v in positional["state"].items() if i > 1}}}  # fmt: skip
    assert positional["state"][0]["exp_avg"].shape != positional["state"][1]["exp_avg"].shape
    with pytest.raises(ValueError):  # moments of another shape: load_checkpoint's "does not fit" (helper 50s)
        _named_positional(swapped, model)
