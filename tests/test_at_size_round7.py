"""uptrain at 70B under FSDP, round 7: what the main process holds while saving, and the order of the checks.

Checkpoint saves and the final merge gathered every trained tensor whole onto the main process (at 70B with every
attention projection trained in full: 48 GB of fp32, then AdamW's 96 GB at each checkpoint). They now gather one
decoder layer at a time, every process in the same order, the main process writing each layer as it arrives. Measured
here on 2 CPU processes (gloo) under FSDP1 and FSDP2 with an 8-layer model: the largest set of gathered tensors
alive at once on the main process, as a share of all trained tensors (or all their moments), by finalizers on the
storages torch's gather returns. This file is also the worker: python test_at_size_round7.py CHECKPOINT OUT.
"""

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

LORA = SimpleNamespace(
    r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"], full_train=["k_proj", "v_proj"]
)
LAYERS = 8
LAYER = re.compile(r"\.layers\.(\d+)\.")


# --- the worker: 2 processes, torch's own FSDP on CPU -----------------------------------------------------------


class Alive:
    """Bytes of the tensors torch's gathers returned that are still alive (storages, by finalizer), and the peak."""

    def __init__(self):
        self.now = self.peak = 0
        self.ids: set[int] = set()

    def track(self, tree) -> None:
        if isinstance(tree, dict):
            for value in tree.values():
                self.track(value)
        elif isinstance(tree, list | tuple):
            for value in tree:
                self.track(value)
        elif isinstance(tree, torch.Tensor):
            storage = tree.untyped_storage()  # one Python object per storage while it lives
            if id(storage) not in self.ids:
                self.ids.add(id(storage))
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self.free, id(storage), storage.nbytes())

    def free(self, key: int, nbytes: int) -> None:
        self.ids.discard(key)
        self.now -= nbytes


def watch_gathers(alive: Alive) -> None:
    """Count every tensor torch's state-dict gather hands back (the whole-state path and a per-layer one alike)."""
    import torch.distributed._state_dict_utils as utils
    import torch.distributed.checkpoint.state_dict as state_dict

    real = utils._gather_state_dict

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        alive.track(result)
        return result

    utils._gather_state_dict = state_dict._gather_state_dict = counted


def trained_student(path: Path, mode: str, rank: int):
    from fsdp_worker import wrap  # the FSDP1/FSDP2 wrapping test_uptrain_fsdp's worker uses

    from clakit.uptrain import student
    from clakit.uptrain.distill import causal_lm_loss

    torch.manual_seed(0)
    model = wrap(student.make_trainable(student.load_cla(path, torch.float32), LORA), mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(1))[rank::2]
    causal_lm_loss(model(input_ids=ids).logits, ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, scheduler


def byte_sizes(model) -> dict[str, int]:
    """Every trainable tensor's bytes (whole), and the largest decoder layer's."""
    from clakit.uptrain import checkpoint

    whole = checkpoint.trainable_state(model)
    layers: dict[str, int] = {}
    for name, tensor in whole.items():
        layer = LAYER.search(name)
        key = layer[1] if layer else name
        layers[key] = layers.get(key, 0) + tensor.numel() * tensor.element_size()
    return {"total": sum(layers.values()), "largest_layer": max(layers.values()), "tensors": len(whole)}


def same_tree(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def save_sharded_stubbed(path: Path, model, out: Path, rank: int, lora=LORA) -> None:
    """uptrain's end under FSDP (pipeline._save_sharded), the held-out scoring and the card stubbed: the merge."""
    from clakit.uptrain import pipeline

    pipeline.heldout_report = lambda *a, **k: {}
    pipeline.with_origin = lambda report, *a, **k: report
    pipeline._card = lambda *a, **k: {}
    pipeline._write_end_eval = lambda *a, **k: None
    pipeline._finish = lambda out, summary, failed, quiet: failed
    recipe = SimpleNamespace(lora=lora, model=SimpleNamespace(allow_pickle=False))
    tokenizer = SimpleNamespace(save_pretrained=lambda folder: None)
    run = {"data": None, "tokenizer": tokenizer, "quiet": True, "dtype": torch.bfloat16, "start_path": path}
    acc = SimpleNamespace(is_main_process=rank == 0)
    failed = pipeline._save_sharded(recipe, out, SimpleNamespace(model=model), run, acc)
    assert failed is None, failed


def run_mode(rank: int, mode: str, path: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    from clakit.errors import ClakitError
    from clakit.uptrain import checkpoint, student

    model, optimizer, scheduler = trained_student(path, mode, rank)
    sizes = byte_sizes(model)
    alive = Alive()
    watch_gathers(alive)
    saved = checkpoint.save_checkpoint(out / "run", 1, model, optimizer, scheduler, {"step": 1})
    result = {"sizes": sizes, "checkpoint_peak": alive.peak}
    # the files are those of the whole state dicts, gathered the old way (what a resume reads)
    whole, moments = checkpoint.trainable_state(model), checkpoint._optimizer_state(model, optimizer)
    if rank == 0:
        result["trainable_same"] = same_tree(
            dict(sorted(load_file(saved / "trainable.safetensors").items())), dict(sorted(whole.items()))
        )
        result["optimizer_same"] = same_tree(torch.load(saved / "optimizer.pt", weights_only=True), moments)
        result["zip_bad_record"] = zipfile.ZipFile(saved / "optimizer.pt").testzip()
    del whole, moments
    base = alive.peak = alive.now  # what is still alive from before (AdamW's own step counts)
    save_sharded_stubbed(path, model, out, rank)
    result["merge_peak"] = alive.peak - base
    # a merge refused on the main process (another LoRA rank than trained) releases the other one, which waits
    # for the next layer otherwise: both reach the barrier (a hang ends at the group's 90 s timeout)
    (out / "bad").mkdir(exist_ok=True)
    try:
        save_sharded_stubbed(path, model, out / "bad", rank, SimpleNamespace(**{**vars(LORA), "r": 8}))
        result["bad_merge"] = "merged"
    except ClakitError as e:
        result["bad_merge"] = str(e)
    torch.distributed.barrier()
    reference = checkpoint.trainable_state(model)
    if rank == 0:
        (out / "reference").mkdir()
        student.save_merged(path, reference, LORA, torch.bfloat16, out / "reference")
        files = sorted(p.name for p in (out / "reference").iterdir())  # model/ has the output marker too
        result["merge_files"] = files
        result["merge_files_same"] = all(
            (out / "model" / f).read_bytes() == (out / "reference" / f).read_bytes() for f in files
        )
    return result


def main(rank: int, path: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["ROUND7_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=90))
    try:
        for mode in ("fsdp1", "fsdp2"):
            (Path(out) / mode).mkdir(parents=True, exist_ok=True)
            result = run_mode(rank, mode, Path(path), Path(out) / mode)
            if rank == 0:
                (Path(out) / mode / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# --- the tests ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deep_cla_checkpoint(tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama with 8 layers, converted to CLA2: 8 layers to gather one at a time."""
    from conftest import save_checkpoint, tiny_model

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout

    path = tmp_path_factory.mktemp("deep_cla2")
    model = cla_model_from(tiny_model("llama", num_hidden_layers=LAYERS), uniform_layout(LAYERS, 2), "mean")
    return save_checkpoint(model, tokenizer, path)


@pytest.fixture(scope="module")
def fsdp_saves(deep_cla_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("round7_fsdp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    root = Path(__file__).resolve().parent
    path = [str(root.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), "ROUND7_PORT": str(free_port())}
    command = [sys.executable, __file__, str(deep_cla_checkpoint), str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_a_checkpoint_save_holds_one_layer_at_a_time_on_the_main_process(fsdp_saves, mode):
    """Before: the whole trainable tensors, then AdamW's whole state (2x them) on rank 0: peak = all the moments,
    0.67 of everything saved. Now: one layer's tensors or moments at a time. The files are the same as the whole
    state dicts' (a resume reads them as before) and the zip's CRCs hold."""
    result = json.loads((fsdp_saves / mode / "result.json").read_text())
    sizes = result["sizes"]
    saved = 3 * sizes["total"]  # the tensors and AdamW's two moments of each
    assert result["trainable_same"] and result["optimizer_same"] and result["zip_bad_record"] is None, result
    # one layer's moments, 2x its tensors, plus AdamW's step counts (4 bytes each)
    bound = 2 * sizes["largest_layer"] + 4 * sizes["tensors"]
    assert result["checkpoint_peak"] <= bound, (result["checkpoint_peak"] / saved, bound / saved)
    assert result["checkpoint_peak"] / saved < 2 / LAYERS, result["checkpoint_peak"] / saved


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_the_final_merge_gathers_one_layer_at_a_time(fsdp_saves, mode):
    """Before: every trained tensor whole on rank 0 for the merge (peak = all of them). Now: the merge asks for
    each layer's as it reaches it; the merged model is byte for byte the one merged from the whole tensors."""
    result = json.loads((fsdp_saves / mode / "result.json").read_text())
    sizes = result["sizes"]
    assert result["merge_files_same"] and "config.json" in result["merge_files"], result
    assert "expected (8, 48) (r=8)" in result["bad_merge"] and not (fsdp_saves / mode / "bad" / "model").exists()
    assert result["merge_peak"] <= sizes["largest_layer"], (result["merge_peak"] / sizes["total"], sizes)
    assert result["merge_peak"] / sizes["total"] < 2 / LAYERS, result["merge_peak"] / sizes["total"]


def test_the_streamed_files_read_back_as_the_whole_ones(tmp_path):
    """One process, the writers called directly: trainable.safetensors and optimizer.pt written a layer at a time
    hold what the whole-dict writers (save_file, torch.save) write: same names, dtypes, values (mmap-loaded too),
    param_groups; the zip's CRCs are those of the bytes (what zipfile checks) and torch's data descriptors agree."""
    import struct

    from safetensors.torch import load_file

    from clakit.uptrain import checkpoint

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))})
    model["head"] = torch.nn.Linear(8, 2).to(torch.bfloat16)
    model.layers[1].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(4, 8)
    for layer in model.layers:
        x = layer(x)
    (x.sum() + model["head"](x.bfloat16()).float().sum()).backward()
    optimizer.step()
    (tmp_path / "whole").mkdir()
    checkpoint._write_whole(model, optimizer, tmp_path / "whole")
    checkpoint.write_trainable(model, tmp_path / "trainable.safetensors")
    checkpoint.write_optimizer(model, optimizer, tmp_path / "optimizer.pt")
    whole = load_file(tmp_path / "whole" / "trainable.safetensors")
    assert same_tree(dict(sorted(load_file(tmp_path / "trainable.safetensors").items())), dict(sorted(whole.items())))
    expected = torch.load(tmp_path / "whole" / "optimizer.pt", weights_only=True)
    for mmap in (False, True):
        assert same_tree(torch.load(tmp_path / "optimizer.pt", weights_only=True, mmap=mmap), expected)
    archive = zipfile.ZipFile(tmp_path / "optimizer.pt")
    assert archive.testzip() is None
    raw = (tmp_path / "optimizer.pt").read_bytes()
    for info in archive.infolist():  # torch keeps each CRC in a data descriptor after the bytes too
        names, extra = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        end = info.header_offset + 30 + names + extra + info.compress_size
        assert raw[end : end + 4] == b"PK\x07\x08" and struct.unpack("<I", raw[end + 4 : end + 8])[0] == info.CRC


# --- uptrain with model.source: the space checked before the conversion --------------------------------------


@pytest.fixture(scope="module")
def stock_checkpoint(tokenizer, tmp_path_factory) -> Path:
    from conftest import save_checkpoint, tiny_model

    return save_checkpoint(tiny_model("llama"), tokenizer, tmp_path_factory.mktemp("stock") / "stock")


def source_recipe(corpus_dir: Path, tmp_path: Path, stock: Path, **convert) -> Path:
    from uptrain_fixtures import tiny_recipe, write_recipe

    model = {"source": str(stock), "convert": {"factor": 2, "init": "mean", **convert}}
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus_dir, tmp_path / "run", model=model))


def test_a_disk_without_room_is_refused_before_the_conversion(stock_checkpoint, corpus_dir, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """With model.source, uptrain's space check (the result and the checkpoints) came after the conversion had run
    (at 70B: hours, then "not enough disk space"). It is checked first now, with the conversion's own output
    counted, and nothing was converted or written."""
    from test_uptrain_run import run_cli

    from clakit.uptrain import pipeline, student

    converted = []
    real = student.convert_source
    monkeypatch.setattr(student, "convert_source", lambda *a, **k: converted.append(1) or real(*a, **k))
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    code, err = run_cli(capsys, source_recipe(corpus_dir, tmp_path, stock_checkpoint))
    assert code == 2 and err.count("\n") == 0 and "not enough disk space" in err, err
    assert converted == [], "the conversion ran before the space check"
    assert "the conversion of model.source" in err and "train.output_dir" in err, err
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("output_dtype,config_dtype", [(None, None), ("bfloat16", None), (None, "bfloat16")])
def test_the_conversion_estimate_bounds_what_it_writes(stock_checkpoint, corpus_dir, tmp_path, capsys, monkeypatch,
                                                       output_dtype, config_dtype):  # fmt: skip
    """The need checked before the conversion is at least what the conversion and the run then write (the
    converted weights, the result, the checkpoints kept), and not far above it; also for a source whose config.json
    names bfloat16 over float32 tensors (the conversion writes the tensors' dtype: settings.dtype)."""
    import shutil

    from test_uptrain_run import run_cli

    from clakit.uptrain import pipeline

    if config_dtype:
        stock_checkpoint = Path(shutil.copytree(stock_checkpoint, tmp_path / "stock"))
        config = json.loads((stock_checkpoint / "config.json").read_text())
        config.update({k: config_dtype for k in ("dtype", "torch_dtype") if k in config} or {"dtype": config_dtype})
        (stock_checkpoint / "config.json").write_text(json.dumps(config))

    asked, check = [], pipeline.outputs.check_free_space
    monkeypatch.setattr(pipeline.outputs, "check_free_space", lambda o, n, *a: asked.append((n, a)) or check(o, n, *a))
    convert = {"output_dtype": output_dtype} if output_dtype else {}
    assert run_cli(capsys, source_recipe(corpus_dir, tmp_path, stock_checkpoint, **convert)) == (0, "")
    before = [n for n, a in asked if a and "the conversion of model.source" in a[0]]
    out = tmp_path / "run"
    written = sum(f.stat().st_size for d in ("converted", "model") for f in (out / d).glob("*.safetensors"))
    written += sum(f.stat().st_size for d in (out / "checkpoints").iterdir() for f in d.iterdir())
    assert len(before) == 1 and written <= before[0] <= 1.5 * written, (before, written)


def test_consumer_patterns_with_a_layout_chosen_on_data_train(stock_checkpoint, corpus_dir, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """With model.convert choosing the layout on data, the space check before the conversion built its skeleton with
    every layer a producer and applied lora's `consumers.` patterns to it: 'matches no linear module (the layout has
    no consumers)', exit 2, for the full_train docs/uptrain.md recommends (--dry-run passed it). They are read as
    their projection on every layer there (the most they select), and the run trains the consumers' q_proj."""
    from safetensors.torch import load_file
    from test_uptrain_run import run_cli
    from uptrain_fixtures import tiny_recipe, write_recipe

    from clakit.uptrain import pipeline

    asked, check = [], pipeline.outputs.check_free_space
    monkeypatch.setattr(pipeline.outputs, "check_free_space", lambda o, n, *a: asked.append((n, a)) or check(o, n, *a))
    convert = {"layout": "auto", "kv_saving": 0.5, "init": "mean", "calib_data": [str(corpus_dir / "calib.txt")],
               "calib_tokens": 256, "seq_len": 32}  # fmt: skip
    lora = {"full_train": ["k_proj", "v_proj", "consumers.q_proj"]}
    model = {"source": str(stock_checkpoint), "convert": convert}
    recipe = tiny_recipe(corpus_dir, tmp_path / "run", model=model, lora=lora, train={"max_steps": 3})
    assert run_cli(capsys, write_recipe(tmp_path / "r.yaml", recipe)) == (0, "")
    layout = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["kv_source_layers"]
    consumers = [i for i, p in enumerate(layout) if p != i]
    assert consumers  # the conversion chose a layout that shares
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    full = {k.removeprefix("base_model.model.") for k in trained if k.endswith("q_proj.weight")}  # not LoRA's
    assert full == {f"model.layers.{i}.self_attn.q_proj.weight" for i in consumers}, sorted(trained)
    before = [n for n, a in asked if a and "the conversion of model.source" in a[0]]
    out = tmp_path / "run"
    written = sum(f.stat().st_size for d in ("converted", "model") for f in (out / d).glob("*.safetensors"))
    assert len(before) == 1 and written <= before[0], (before, written)  # an upper bound still


def test_the_check_before_the_conversion_draws_nothing_from_the_rng(stock_checkpoint, corpus_dir, tmp_path):
    """Its skeleton's LoRA adapters are initialised on the CPU by peft (then moved to meta): drawn from torch's RNG
    they shifted the student's LoRA init, so a run converting model.source on the fly trained from other adapters
    than one given the converted checkpoint (test_uptrain_distributed: gate_proj's merged weights differed)."""
    from clakit.uptrain import pipeline
    from clakit.uptrain.recipe import load_recipe
    from clakit.uptrain.trainer import step_shape

    recipe = load_recipe(source_recipe(corpus_dir, tmp_path, stock_checkpoint))
    data = SimpleNamespace(train=[None] * 8, seq_len=recipe.data.seq_len)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    shape = step_shape(recipe.train, 1)
    pipeline.check_conversion_space(tmp_path, recipe.model, recipe, data, shape, True)
    assert torch.equal(torch.get_rng_state(), before)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    mp.spawn(main, args=tuple(sys.argv[1:3]), nprocs=2)
