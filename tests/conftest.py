"""Shared fixtures: tiny random Llama/Mistral models and checkpoints, an offline tokenizer, a small text corpus.

Everything is built in code (no Hub): a byte-level BPE tokenizer trained on public-domain-style text generated here,
and models with hidden 48, 4 layers, 4 heads, 2 KV heads (GQA), saved split over several safetensors shards.
"""

import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

VOCAB = 320
WORDS = (
    "the of and to in that he shall unto for his a they be is him not them it with all thou thy was god which my "
    "me said but ye their have will thee from as are when this out were upon man by you israel king son up there "
    "hacker program code system bug kludge feature user file machine net jargon hack mode wizard"
).split()


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-text: sentences of common words, so a tiny model sees repeated structure."""
    rng = random.Random(seed)
    sentences = []
    while n_words > 0:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([make_text(3000, 0)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_kwargs(num_hidden_layers: int = 4) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_model(kind: str = "llama", num_hidden_layers: int = 4, seed: int = 0, **overrides):
    """A stock LlamaForCausalLM / MistralForCausalLM with random weights (std 0.1 so layers really differ)."""
    torch.manual_seed(seed)
    kwargs = {**tiny_kwargs(num_hidden_layers), "initializer_range": 0.1, **overrides}
    if kind == "mistral":
        kwargs.setdefault("sliding_window", 16)
        model = MistralForCausalLM(MistralConfig(**kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.eval()


def save_checkpoint(model, tokenizer, path: Path, max_shard_size: str = "150KB") -> Path:
    """save_pretrained split over several shards (with model.safetensors.index.json) plus the tokenizer."""
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """train.txt / calib.txt / heldout.txt: disjoint deterministic texts."""
    d = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(["train", "calib", "heldout"]):
        (d / f"{name}.txt").write_text(make_text(4000, seed=i + 1))
    return d


@pytest.fixture(scope="session", params=["llama", "mistral"])
def tiny_checkpoint(request, tokenizer, tmp_path_factory) -> Path:
    """A stock tiny Llama (and Mistral) checkpoint folder saved over several safetensors shards."""
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    return save_checkpoint(tiny_model(request.param), tokenizer, path)


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    return save_checkpoint(tiny_model("llama"), tokenizer, path)
