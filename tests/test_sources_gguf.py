"""A damaged .gguf (empty, not GGUF, header or tensor data cut short) is one line naming the problem, from the
library and from `clakit eval`, with no traceback and no output; a sound file is not called damaged."""

import numpy as np
import pytest
from conftest import make_text

from clakit.cli import main
from clakit.errors import ClakitError
from clakit.sources import gguf_problem, load_config, resolve_source


def write_gguf(path, hidden: int = 16, split_max_tensors: int = 0, metadata: bool = True):
    """A small, sound GGUF file (llama metadata unless `metadata` is off, two fp32 tensors) written with the gguf
    package; `split_max_tensors` 1 writes it as gguf-split parts."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(2)
    if metadata:
        writer.add_context_length(64)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(2 * hidden)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, hidden), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def broken(tiny_gguf, tmp_path, kind: str):
    data = tiny_gguf.read_bytes()
    content = {
        "empty": b"",
        "garbage": bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        "header_cut": data[:60],  # inside the metadata
        "data_cut": data[:-100],  # inside the last tensor
    }[kind]
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(content)
    return path


CASES = [
    ("empty", "the file is empty"),
    ("garbage", "not a GGUF file"),
    ("header_cut", "the GGUF file is truncated or damaged (60 bytes"),
    ("data_cut", "the GGUF file is truncated or damaged"),
]


def test_sound_gguf_reads_and_is_not_called_damaged(tiny_gguf):
    assert gguf_problem(tiny_gguf) is None
    assert load_config(resolve_source(str(tiny_gguf))).hidden_size == 16


@pytest.mark.parametrize(("kind", "needle"), CASES)
def test_damaged_gguf_is_one_clakit_error(tiny_gguf, tmp_path, kind, needle):
    path = broken(tiny_gguf, tmp_path, kind)
    with pytest.raises(ClakitError) as e:
        load_config(resolve_source(str(path)))
    assert needle in str(e.value) and "\n" not in str(e.value) and path.name in str(e.value)


@pytest.mark.parametrize(("kind", "needle"), CASES[1:3])
def test_clakit_eval_on_a_damaged_gguf_exits_2_with_one_line(capsys, tiny_gguf, tmp_path, kind, needle):
    path, report = broken(tiny_gguf, tmp_path, kind), tmp_path / "r.json"
    (tmp_path / "text.txt").write_text(make_text(300, 3))
    code = main(["eval", str(path), "-o", str(report), "--data", str(tmp_path / "text.txt"), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("clakit: error: cannot read") and err.count("\n") == 1 and needle in err
    assert not report.exists() and path.stat().st_size in (60, 4096)  # the source untouched


@pytest.mark.parametrize("name", ["Tiny.GGUF", "tiny.Gguf", "tiny-q4"])
def test_gguf_in_any_case_or_without_the_suffix_is_read(tiny_gguf, tmp_path, name):
    """`Model.GGUF` (as some hosts name it) was refused as "neither a checkpoint folder nor a .gguf file"; a file
    with the GGUF magic bytes is GGUF whatever its name."""
    path = tmp_path / name
    path.write_bytes(tiny_gguf.read_bytes())
    source = resolve_source(str(path))
    assert source.kind == "gguf" and source.gguf_file == name
    assert load_config(source).hidden_size == 16


def test_a_file_that_is_not_gguf_is_still_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ClakitError, match="neither a checkpoint folder nor a .gguf file"):
        resolve_source(str(path))


def test_loaded_models_are_never_kernelized_from_the_hub(tiny_llama_checkpoint):
    """transformers kernelizes on load and on train() unless told not to; on a GPU that downloads liger's RMSNorm
    (or fails offline). Checked here on the flag: a loaded model, put in training mode, must not use hub kernels."""
    from clakit.sources import load_model

    model = load_model(resolve_source(str(tiny_llama_checkpoint)))
    model.train()
    assert model.use_kernels is False


def test_a_split_gguf_is_refused_naming_the_merge(tiny_gguf, tmp_path):
    """llama.cpp's gguf-split parts (how the Hub holds large GGUFs): transformers reads only the file given, so the
    first part lost the other parts' tensors as "metadata that does not describe its tensors: download it again",
    and a later part (no architecture) was "download it again" too. Refused from the header, naming the merge."""
    write_gguf(tmp_path / "m.gguf", split_max_tensors=1, metadata=False)
    parts = sorted(tmp_path.glob("m-0000*-of-00002.gguf"))
    assert len(parts) == 2
    for number, part in enumerate(parts, 1):
        needle = f"is part {number} of a GGUF split into 2 files.*llama-gguf-split --merge"
        with pytest.raises(ClakitError, match=needle):
            load_config(resolve_source(str(part)))


def test_a_gguf_without_tokenizer_metadata_names_that(tiny_gguf):
    """The fixture has no tokenizer.ggml.* keys: its config reads, its tokenizer is refused as absent (transformers'
    words were "stating tokenizer None", with "download it again")."""
    from clakit.sources import load_tokenizer

    source = resolve_source(str(tiny_gguf))
    assert load_config(source).hidden_size == 16
    with pytest.raises(ClakitError, match="holds no tokenizer \\(no tokenizer.ggml.model metadata\\)"):
        load_tokenizer(source)


def test_a_gguf_config_is_read_once_per_file_version(tiny_gguf, tmp_path, monkeypatch):
    """transformers parses a GGUF's whole header for its config (5-8 s for SmolLM2-135M here) and one command asked
    up to three times (load_config, check_config_fits_weights, the load): read once per version of the file now.
    Each call gets its own copy (callers set fields on it), and a rewritten file is read again."""
    import shutil

    from transformers import AutoConfig

    from clakit.sources import check_config_fits_weights

    reads = []
    real = AutoConfig.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        reads.append(kwargs.get("gguf_file"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(counted))
    path = shutil.copy(tiny_gguf, tmp_path / "copy.gguf")
    source = resolve_source(str(path))
    first = load_config(source)
    first.hidden_size = 99
    check_config_fits_weights(source)
    assert load_config(source).hidden_size == 16 and reads == ["copy.gguf"]
    write_gguf(path, hidden=32)  # another version of the file under the same name
    assert load_config(resolve_source(str(path))).hidden_size == 32 and len(reads) == 2


def test_the_gguf_header_checks_read_the_file_as_it_is_now(tiny_gguf, tmp_path):
    """The header caches were keyed on (path, mtime): a file rewritten in place with its mtime set back (cp -p,
    rsync --inplace) kept the old header's facts beside the new config (helper R3). Keyed on the file's version
    (device, inode, size, mtime, ctime) now."""
    import os
    import shutil

    from clakit.sources import _header_elements

    path = shutil.copy(tiny_gguf, tmp_path / "copy.gguf")
    source = resolve_source(str(path))
    assert _header_elements(source)[1] == 8 * 16 + 16  # token_embd (8, 16) and output_norm (16,)
    stat = os.stat(path)
    write_gguf(path, hidden=32)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _header_elements(source)[1] == 8 * 32 + 32
    assert load_config(source).hidden_size == 32
