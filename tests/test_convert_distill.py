"""The end-to-end distillation stage of `clakit convert` (`--distill-steps`): the student it trains is the CLA model,
it trains only attention projections, lowers the KL to the source on the calibration tokens, and what it trains is
what gets written."""

import pytest
import torch
from conftest import tiny_model
from convert_fixtures import load, logits, read_json, run_cli

from clakit.convert import calibrate, distill, pipeline
from clakit.convert.config import DEFAULT_DISTILL_STEPS, ConvertConfig
from clakit.convert.inmemory import cla_model_from
from clakit.losses import token_kl

LAYOUT = [0, 0, 2, 2]


@pytest.fixture(params=["llama", "mistral"])
def source(request):
    return tiny_model(request.param)


def _ids(n: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(1))


def test_student_is_the_cla_model_sharing_the_source_weights(source):
    fitted = {
        "model.layers.0.self_attn.k_proj.weight": torch.randn_like(source.model.layers[0].self_attn.k_proj.weight)
    }
    student = distill.cla_student(source, LAYOUT, fitted)
    reference = cla_model_from(source, LAYOUT, "mean", overrides=fitted)
    torch.testing.assert_close(logits(student), logits(reference), rtol=0, atol=0)
    mlp = source.model.layers[1].mlp.up_proj.weight
    assert student.model.layers[1].mlp.up_proj.weight.data_ptr() == mlp.data_ptr()  # shared, not copied


def test_distill_lowers_kl_trains_only_attention_and_leaves_the_source_alone(source):
    ids = _ids()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    student = distill.cla_student(source, LAYOUT, {})
    teacher = distill.teacher_logits(source, ids)
    assert len(teacher) == 2 and teacher[0].dtype == torch.bfloat16 and teacher[0].shape == (2, 32, 320)
    trained, record = distill.distill(student, ids, teacher, steps=30, lr=3e-3, seed=0, progress=False)
    assert record["kl_after"] < 0.8 * record["kl_before"] and len(record["losses"]) == 30
    assert set(trained) == set(distill.trained_names(student.state_dict()))
    assert all(".self_attn." in n and n.rsplit(".", 2)[-2] in distill.TRAINED for n in trained)
    # consumers hold no K/V: the trained set is q/o everywhere plus the producers' k/v
    assert (
        "model.layers.1.self_attn.k_proj.weight" not in trained and "model.layers.2.self_attn.k_proj.weight" in trained
    )
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    changed = [n for n in trained if not torch.equal(trained[n], before.get(n, trained[n] * 0))]
    assert changed  # it really trained


def test_distill_is_deterministic(source):
    ids = _ids()
    runs = []
    for _ in range(2):
        student = distill.cla_student(source, LAYOUT, {})
        runs.append(distill.distill(student, ids, distill.teacher_logits(source, ids), steps=5, lr=1e-3, seed=3,
                                    progress=False)[0])  # fmt: skip
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0)


def test_convert_writes_the_distilled_tensors_and_records_the_stage(tiny_llama_checkpoint, corpus_dir, tmp_path):
    args = ("--factor", "2", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "512", "--seq-len", "64")
    assert run_cli(tiny_llama_checkpoint, tmp_path / "off", *args, "--distill-steps", "0", "-q") == 0
    assert (
        run_cli(
            tiny_llama_checkpoint, tmp_path / "on", *args, "--distill-steps", "20", "--distill-tokens", "1024", "-q"
        )
        == 0
    )
    on, off = read_json(tmp_path / "on" / "clakit_convert.json"), read_json(tmp_path / "off" / "clakit_convert.json")
    assert on["settings"]["distill_steps"] == 20 and off["settings"]["distill_steps"] == 0 and off["distill"] is None
    assert (on["settings"]["distill_copy_fraction"], on["settings"]["distill_copy_span"]) == (1.0, 32)  # defaults
    assert (off["settings"]["distill_copy_fraction"], off["settings"]["distill_copy_span"]) == (0, 0)  # no windows
    assert on["distill"]["kl_after"] < on["distill"]["kl_before"] and len(on["distill"]["losses"]) == 20
    assert on["distill"]["tokens"] == 1024 and on["config"]["distill_tokens"] == 1024  # its own tokens, not 512
    assert on["config"]["distill_lr"] == ConvertConfig.distill_lr
    assert set(on["stage_seconds"]) == {"fit", "distill", "write", "total"} and "distill" not in off["stage_seconds"]
    assert 0 < on["stage_seconds"]["distill"] < on["stage_seconds"]["total"]
    card = (tmp_path / "on" / "README.md").read_text()
    row = "| end-to-end distillation | 20 steps on the calibration tokens (all of its windows end with a copy of an"
    assert row + " earlier span of 32 tokens)" in card
    assert "| end-to-end distillation | none |" in (tmp_path / "off" / "README.md").read_text()
    # the written model is the distilled one: it differs from the undistilled in attention only
    a, b = load(tmp_path / "on").state_dict(), load(tmp_path / "off").state_dict()
    differ = {n for n in a if not torch.equal(a[n], b[n])}
    assert differ and all(".self_attn." in n for n in differ)
    assert not torch.equal(logits(load(tmp_path / "on")), logits(load(tmp_path / "off")))


def test_copies_reach_the_distillation_windows_only(tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch):
    """--distill-copy-fraction 1: every window the teacher and student see ends with a repeat of an earlier span of
    itself; the layout/fit windows are the text as read."""
    seen, real_logits, real_fit = {}, distill.teacher_logits, calibrate.fit_kv

    def teacher_logits(model, ids):
        seen["distill"] = ids.clone()
        return real_logits(model, ids)

    def fit_kv(model, layout, ids, *args, **kwargs):
        seen["fit"] = ids.clone()
        return real_fit(model, layout, ids, *args, **kwargs)

    monkeypatch.setattr(distill, "teacher_logits", teacher_logits)
    monkeypatch.setattr(calibrate, "fit_kv", fit_kv)
    args = ("--factor", "2", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "512", "--seq-len", "64",
            "--distill-steps", "2", "--distill-tokens", "1024", "--reconstruct-steps", "2", "-q")  # fmt: skip
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out", *args, "--distill-copy-fraction", "1",
                   "--distill-copy-span", "8") == 0  # fmt: skip
    tok = pipeline.load_tokenizer(pipeline.resolve_source(str(tiny_llama_checkpoint), None, False), False)
    texts = pipeline.load_texts([str(corpus_dir / "calib.txt")])
    clean = calibrate.calib_input_ids(tok, texts, 1024, 64)
    torch.testing.assert_close(seen["fit"], calibrate.calib_input_ids(tok, texts, 512, 64), rtol=0, atol=0)
    got = seen["distill"]
    assert got.shape == clean.shape and torch.equal(got[:, :-8], clean[:, :-8]) and not torch.equal(got, clean)
    for row in got:  # the tail repeats a span that ends before it
        assert any(torch.equal(row[s : s + 8], row[-8:]) for s in range(0, 64 - 16 + 1))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "(all of its windows end with a copy of an earlier span of 8 tokens)" in card
    record = read_json(tmp_path / "out" / "clakit_convert.json")
    assert record["config"]["distill_copy_fraction"] == 1 and record["settings"]["distill_copy_span"] == 8


def test_default_copy_span_fits_short_windows(tiny_llama_checkpoint, corpus_dir, tmp_path):
    args = ("--factor", "2", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "256", "--seq-len", "16",
            "--distill-steps", "2", "--distill-tokens", "256", "--reconstruct-steps", "2", "-q")  # fmt: skip
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out", *args) == 0
    settings = read_json(tmp_path / "out" / "clakit_convert.json")["settings"]
    assert (settings["distill_copy_fraction"], settings["distill_copy_span"]) == (1.0, 8)  # half of a 16-token window


def test_a_layout_sharing_nothing_records_no_distillation_copies(tiny_llama_checkpoint, corpus_dir, tmp_path):
    """--factor 1 skips the distillation (nothing shares K/V), but the record kept its copy settings (1.0, 16), so
    its own rerun line recorded other settings than it (helper 50e); and the rerun line pinned --distill-steps=0
    beside the distillation settings given, which convert refuses there. It replays now, to the same settings."""
    import shlex

    from clakit.cli import main

    args = ("--factor", "1", "--init", "calibrated", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens",
            "256", "--seq-len", "32", "--distill-steps", "1", "--distill-lr", "0.001",
            "--distill-copy-fraction", "0.5", "-q")  # fmt: skip
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out", *args) == 0
    record = read_json(tmp_path / "out" / "clakit_convert.json")
    settings = record["settings"]
    assert (settings["distill_steps"], settings["distill_copy_fraction"], settings["distill_copy_span"]) == (0, 0, 0)
    rerun = shlex.split(record["provenance"]["rerun"])
    assert rerun[1:3] == ["clakit", "convert"] and not any(a.startswith("--distill-lr") for a in rerun)
    argv = [str(tmp_path / "again") if a == "NEW_OUT" else a for a in rerun[2:]]
    assert main([*argv, "-q"]) == 0
    assert read_json(tmp_path / "again" / "clakit_convert.json")["settings"] == settings


def test_default_distills_when_it_fits_and_skips_with_a_note_when_not(
    tiny_llama_checkpoint, corpus_dir, tmp_path, monkeypatch, capsys
):
    args = ("--factor", "2", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "512", "--seq-len", "64")
    assert run_cli(tiny_llama_checkpoint, tmp_path / "fits", *args, "--reconstruct-steps", "2", "-q") == 0
    assert read_json(tmp_path / "fits" / "clakit_convert.json")["settings"]["distill_steps"] == DEFAULT_DISTILL_STEPS
    monkeypatch.setattr(pipeline, "_free_memory", lambda device: 1000)  # a device far too small
    assert run_cli(tiny_llama_checkpoint, tmp_path / "small", *args, "--reconstruct-steps", "2") == 0
    assert "end-to-end distillation needs" in capsys.readouterr().err
    assert read_json(tmp_path / "small" / "clakit_convert.json")["settings"]["distill_steps"] == 0
    # asked for explicitly, it is refused before anything is written
    assert run_cli(tiny_llama_checkpoint, tmp_path / "asked", *args, "--distill-steps", "10") == 2
    assert "--distill-steps needs the whole model" in capsys.readouterr().err
    assert not (tmp_path / "asked").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--init", "mean", "--distill-steps", "5"), "fits nothing"),
        (("--init", "reconstruct", "--distill-steps", "-1"), "--distill-steps must be 0"),
        (("--init", "reconstruct", "--distill-lr", "0"), "--distill-lr must be > 0"),
        (("--init", "reconstruct", "--distill-tokens", "0"), "--distill-tokens must be a positive number"),
        (("--init", "reconstruct", "--distill-copy-fraction", "1.5"), "--distill-copy-fraction must be between 0"),
        (("--init", "reconstruct", "--distill-copy-fraction", "-0.1"), "--distill-copy-fraction must be between 0"),
        (("--init", "reconstruct", "--distill-copy-fraction", "nan"), "--distill-copy-fraction must be a finite"),
        (("--init", "reconstruct", "--distill-copy-span", "0"), "--distill-copy-span must be a positive number"),
        (("--seq-len", "64", "--distill-copy-fraction", "0.5", "--distill-copy-span", "33"),
         "--distill-copy-span (33) must be at most half the 64-token window"),
        (("--distill-steps", "0", "--distill-copy-fraction", "0.5"), "which this conversion does not run"),
        (("--init", "mean", "--distill-copy-fraction", "0.5"), "which this conversion does not run"),
        # recorded in the config while the settings said None, exit 0: now refused as --distill-steps is
        (("--init", "mean", "--reconstruct-steps", "5"), "--init mean runs none: drop it, or use --init reconstruct"),
        (("--init", "calibrated", "--reconstruct-steps", "5"), "--reconstruct-steps sets the steps of --init recon"),
    ],
)
def test_bad_distill_settings_are_one_line_exit_2(tiny_llama_checkpoint, corpus_dir, tmp_path, capsys, extra, message):
    args = ("--factor", "2", "--calib-data", corpus_dir / "calib.txt", "--calib-tokens", "512", *extra)
    assert run_cli(tiny_llama_checkpoint, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_memory_estimate_grows_with_the_model():
    from transformers import LlamaConfig

    small = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320)  # fmt: skip
    big = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    assert distill.distill_bytes(small, [0, 0, 2, 2], torch.float32, 64, 8) < 10**7
    assert distill.distill_bytes(big, list(range(80)), torch.bfloat16, 512, 64) > 140 * 10**9  # a 70B: its weights


def test_recorded_kl_is_the_mean_over_batches_spread_over_the_set(source, monkeypatch):
    ids = _ids(n=10)  # 5 batches of BATCH_SEQS=2
    student = distill.cla_student(source, LAYOUT, {})
    teacher = distill.teacher_logits(source, ids)
    with torch.no_grad():
        per_batch = [float(token_kl(student(ids[2 * i : 2 * i + 2]).logits, t)) for i, t in enumerate(teacher)]
    monkeypatch.setattr(distill, "KL_BATCHES", 3)  # batches 0, 2, 4
    want = (per_batch[0] + per_batch[2] + per_batch[4]) / 3
    assert distill._measured_kl(student, ids, teacher) == pytest.approx(want, rel=1e-6)
    monkeypatch.setattr(distill, "KL_BATCHES", 99)  # more than there are: every batch once
    assert distill._measured_kl(student, ids, teacher) == pytest.approx(sum(per_batch) / 5, rel=1e-6)


def test_card_names_the_share_of_windows_with_copies():
    from clakit.convert.output_folder import _distill_line

    record = {"distill": {"kl_before": 1.0, "kl_after": 0.5}}
    line = _distill_line({"distill_steps": 5, "distill_copy_fraction": 0.25, "distill_copy_span": 16}, record)
    assert line.startswith("5 steps on the calibration tokens (0.25 of its windows end with a copy of an earlier span")
    assert "span of 16 tokens), KL" in line
    assert "copy" not in _distill_line({"distill_steps": 5}, record)  # a record written before the copies existed
