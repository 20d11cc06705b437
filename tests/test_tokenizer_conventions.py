"""Tokenizer conventions of the families users have (helper J, stop 47): a tokenizer that adds BOS itself (Llama 2,
Mistral, Llama 3) against one that adds none (SmolLM2, Qwen), and a SentencePiece-only checkpoint."""

import json

import pytest
from conftest import build_tokenizer, make_text, save_checkpoint, tiny_model
from tokenizers.processors import TemplateProcessing

from clakit.corpus import Text
from clakit.errors import ClakitError
from clakit.eval import evaluate
from clakit.uptrain.packing import document_start, tokenize


def adds_bos():
    """The tests' tokenizer with a post-processor that starts every text with BOS, as Llama's and Mistral's do."""
    tok = build_tokenizer()
    bos = (tok.bos_token, tok.bos_token_id)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    return tok


def test_packed_documents_start_with_bos_where_the_tokenizer_adds_one():
    """Packing joined documents with EOS alone, for every family: Llama/Mistral students (and the teacher they are
    distilled from) trained on BOS-less text, while every prompt they are given starts with BOS (the attention sink
    whose K/V CLA shares). A tokenizer that adds no BOS (SmolLM2's) packs as before."""
    texts = [Text("a", make_text(60, 1)), Text("b", make_text(60, 2))]
    plain, llama = build_tokenizer(), adds_bos()
    bos, eos = llama.bos_token_id, llama.eos_token_id
    assert document_start(plain) == [] and document_start(llama) == [bos]
    before, after = tokenize(plain, texts).tolist(), tokenize(llama, texts).tolist()
    docs = [plain(t.text, add_special_tokens=False)["input_ids"] for t in texts]
    assert before == docs[0] + [eos] + docs[1] + [eos]  # unchanged
    assert after == [bos] + docs[0] + [eos] + [bos] + docs[1] + [eos]


def test_a_sentencepiece_only_tokenizer_without_its_libraries_names_them(tmp_path, monkeypatch):
    """tokenizer.model alone (no tokenizer.json: Llama-2/Mistral checkpoints of older tools) needs sentencepiece and
    protobuf, which clakit does not install; transformers then read it as a tiktoken file and said "`tiktoken` is
    required", the wrong package."""
    import importlib.util

    from clakit.sources import load_tokenizer, resolve_source

    folder = save_checkpoint(tiny_model("llama"), build_tokenizer(), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    (folder / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # a protobuf's start
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "sentencepiece", "google", "google.protobuf") else find(name, *a))  # fmt: skip
    with pytest.raises(ClakitError, match="is a SentencePiece model only .* needs sentencepiece and protobuf: pip "
                                          "install sentencepiece protobuf"):  # fmt: skip
        load_tokenizer(resolve_source(str(folder)))


def test_the_report_records_the_token_ids_it_scored_and_the_tokenizer_libraries(tiny_llama_checkpoint):
    """The same text and tokenizer files tokenized otherwise (another tokenizers or sentencepiece version, an edited
    normalizer) is another measurement: data.sha256 alone did not show it. A tokenizer that adds BOS itself scores
    the very ids of one that does not: one BOS, not two."""
    from tokenizers.normalizers import Lowercase

    lowercased = build_tokenizer()
    lowercased.backend_tokenizer.normalizer = Lowercase()
    model, text = tiny_model("llama"), make_text(300, 3)
    runs = [evaluate(model, tokenizer=tok, text=text, seq_len=32, speed=False, quiet=True)
            for tok in (build_tokenizer(), adds_bos(), lowercased)]  # fmt: skip
    assert text != text.lower() and len({r["data"]["sha256"] for r in runs}) == 1
    assert runs[0]["data"]["ids_sha256"] == runs[1]["data"]["ids_sha256"] != runs[2]["data"]["ids_sha256"]
    assert {"tokenizers", "sentencepiece", "protobuf"} <= set(runs[0]["provenance"])


def test_documents_of_a_tokenizer_without_eos_are_kept_apart():
    """With no EOS token nothing went between packed documents: the end of one and the start of the next read as one
    word ("...of a" + "f}, {C|N..."). They are separated as eval joins texts (corpus.SEPARATOR) now."""
    from clakit.corpus import SEPARATOR

    tok = build_tokenizer()
    tok.eos_token = None
    assert tok.eos_token_id is None
    texts = [Text("a", "alpha beta"), Text("b", "gamma delta")]
    assert tok.decode(tokenize(tok, texts).tolist()) == "alpha beta" + SEPARATOR + "gamma delta" + SEPARATOR


@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_held_out_tail_is_scored_as_text_not_with_literal_eos_strings(adds_bos):
    """The uptrain run's held-out tail (data.eval_fraction) was its packed ids decoded whole: every EOS became the
    text "<|endoftext|>", 13 bytes of text in bits per byte. Its documents are joined as eval joins files now."""
    from clakit.corpus import SEPARATOR
    from clakit.uptrain.pipeline import _heldout_text

    tokenizer = build_tokenizer()
    if adds_bos:  # BOS is also the EOS here: the split must come first
        bos = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
        assert document_start(tokenizer) == [tokenizer.eos_token_id]
    texts = [make_text(300, 7), make_text(200, 8), make_text(250, 9)]
    ids = tokenize(tokenizer, [Text(f"d{i}", t) for i, t in enumerate(texts)])
    text = _heldout_text(ids[: len(ids) // 8 * 8].view(-1, 8), tokenizer)  # as packed in blocks, tail cut
    assert "<|endoftext|>" not in text
    whole = SEPARATOR.join(texts)
    assert whole.startswith(text) and len(text) > len(SEPARATOR.join(texts[:2]))
