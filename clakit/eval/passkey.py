"""Synthetic passkey retrieval (the long-context literature's test, e.g. Mohtashami & Jaggi 2023): a number hidden at
a depth in filler text, asked for at the end, scored by exact match of the greedy answer.

Built offline from local text: the filler is the evaluation text itself (`clakit eval --data`). A prompt of exactly
`length` tokens is

    [BOS] INSTRUCTION  filler[:a]  NEEDLE(key)  filler[a:]  QUESTION          (token ids, concatenated)

where the filler fills the prompt to `length` tokens and `a = round(depth * filler tokens)` of it come before the
needle: depth 0 puts the key right after the instruction, depth 1 right before the question. Each (length, depth)
cell has `samples` prompts; sample s of a cell draws its 5-digit key and the start of its filler from
`random.Random(f"{seed}:{length}:{depth}:{s}")`, so prompts are the same on every run and machine. The model
decodes `len(key) + 3` tokens greedily (prefill into a `DynamicCache`, then one token per step: CLA models decode
through their shared cache); the answer is the first run of digits in the decoded text, correct when it equals the
key.
"""

import hashlib
import random
import re
from dataclasses import dataclass, field, replace

import torch

from clakit import corpus
from clakit.errors import ClakitError
from clakit.eval import kvcache
from clakit.provenance import settings_from_record

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it.\n"
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 2
EXTRA_TOKENS = 3  # decoded beyond the key's digits (a leading space, punctuation)
# what a report's passkey.settings holds beside the settings: derived from them, for the reader (5 digits + EXTRA)
DERIVED = ("new_tokens",)


@dataclass
class PasskeySettings:
    lengths: list[int] | None = None  # prompt lengths in tokens; None: 1024, 2048, ... up to the model's window
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    samples: int = DEFAULT_SAMPLES
    seed: int = 0

    @classmethod
    def from_record(cls, record: dict) -> "PasskeySettings":
        """The settings a report's passkey.settings recorded (lengths and depths as resolved: they ask the same
        prompts again); its derived keys are dropped."""
        return settings_from_record(cls, record, "passkey.settings", DERIVED)

    def check(self) -> None:
        """Everything but what needs the model (its window), before anything is loaded."""
        if self.lengths is not None and (
            not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths)
        ):
            raise ClakitError(f"--passkey-lengths must be positive token counts, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ClakitError(f"--passkey-depths must be fractions between 0 and 1, got {self.depths}")
        if not isinstance(self.samples, int) or self.samples <= 0:
            raise ClakitError(f"--passkey-samples must be a positive integer, got {self.samples}")


@dataclass(frozen=True)
class Prompt:
    length: int
    depth: float
    sample: int
    key: str
    ids: torch.Tensor  # (length,)


def default_lengths(max_len: int, smallest: int = 1024) -> list[int]:
    """1024, 2048, ... and the largest prompt that fits the window (the answer's tokens included)."""
    top = max_len - (5 + EXTRA_TOKENS)
    out = [n for n in (smallest << i for i in range(16)) if n < top]
    return out + [top]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


# a word the pieces below are encoded after: their leading newline never merges with it
ANCHOR = "a"


def _inner_ids(tokenizer, piece: str) -> list[int]:
    """`piece`'s tokens as it reads inside running text. A tokenizer that marks the start of every text it encodes
    (SentencePiece's "▁" prefix in Llama-2's and Mistral's, ByteLevel's add_prefix_space) would put a space token
    before each piece's newline; encoded after ANCHOR, whose tokens are then dropped, it gets the tokens the whole
    prompt's text has there. Where ANCHOR's tokens do not lead the joint encoding (merged across the seam): the piece
    alone."""
    anchor, joint = _ids(tokenizer, ANCHOR), _ids(tokenizer, ANCHOR + piece)
    if joint[: len(anchor)] == anchor and len(joint) > len(anchor):
        return joint[len(anchor) :]
    return _ids(tokenizer, piece)


def _filler_ids(tokenizer, texts: "list[corpus.Text]", need: int) -> list[int]:
    """Token ids of the texts' head, enough to fill a `need`-token prompt, read no further: 16 characters a token
    first, then 4x longer while too few tokens came (text of long whitespace runs: 34 characters a token was
    refused as "too few tokens" from a text of 18,000). All of the texts when they are shorter."""
    chars = 16 * need + 4096
    while True:
        text = corpus.head(texts, chars + 1)  # one more character tells whether there is more
        ids = _ids(tokenizer, text[:chars])
        if len(text) <= chars or len(ids) >= need:
            return ids
        chars *= 4


# the needle's and the question's own words, however spelt ("pass-key", "pass_key_1", "PASSKEYS", "passkey2"), not
# "pass keyboard" or "bypass key": letters, not word characters, bound it (\b missed "pass_key_1" and "passkey2")
DECOY = re.compile(r"(?<![a-z])pass[\s_-]*keys?(?![a-z])", re.IGNORECASE)


def _check_no_decoy(tokenizer, filler: list[int]) -> None:
    """Filler text that speaks of a pass key (a text about this very test, or one holding earlier prompts) gives the
    model another key to answer with: its accuracy would not be retrieval's. Refused before any model runs."""
    found = DECOY.search(tokenizer.decode(filler))
    if found:
        raise ClakitError(
            f"the passkey filler (from the --data text) contains {found.group(0)!r}, the prompt's own words: a model "
            "could answer with a key from the filler instead of the hidden one; give --data text that does not "
            "mention a pass key"
        )


class PromptBuilder:
    """Token ids of the fixed parts, and the filler, from the evaluation text."""

    def __init__(self, tokenizer, filler_text: "str | list[corpus.Text]", max_length: int):
        from clakit.eval.perplexity import prefix_token_id

        prefix = prefix_token_id(tokenizer)
        self.tokenizer = tokenizer
        self.head = ([prefix] if prefix is not None else []) + _ids(tokenizer, INSTRUCTION)
        self.question = _inner_ids(tokenizer, QUESTION)  # the needle's and question's: mid-text, after filler
        texts = [corpus.Text("<filler>", filler_text)] if isinstance(filler_text, str) else filler_text
        self.filler = _filler_ids(tokenizer, texts, max_length)
        _check_no_decoy(tokenizer, self.filler)


    def fixed(self, key: str) -> int:
        return len(self.head) + len(_inner_ids(self.tokenizer, NEEDLE.format(key=key))) + len(self.question)

    def build(self, length: int, depth: float, sample: int, seed: int) -> Prompt:
        rng = random.Random(f"{seed}:{length}:{depth}:{sample}")
        key = str(rng.randint(10000, 99999))
        needle = _inner_ids(self.tokenizer, NEEDLE.format(key=key))
        n_fill = length - len(self.head) - len(needle) - len(self.question)
        if n_fill < 0:  # the fixed parts' size depends on the tokenizer: name it, not a guess that may not fit
            raise ClakitError(
                f"--passkey-lengths {length} is shorter than the prompt without filler ({length - n_fill} tokens "
                "with this tokenizer); use lengths well above that"
            )
        if n_fill > len(self.filler):
            raise ClakitError(
                f"the evaluation text has {len(self.filler)} tokens, too few to fill a {length}-token passkey "
                "prompt; give more text (--data) or shorter --passkey-lengths"
            )
        start = rng.randint(0, len(self.filler) - n_fill)
        filler = self.filler[start : start + n_fill]
        a = round(depth * n_fill)
        ids = self.head + filler[:a] + needle + filler[a:] + self.question
        return Prompt(length, depth, sample, key, torch.tensor(ids, dtype=torch.long))


def answer(text: str) -> str | None:
    """The first run of digits in the model's continuation (None when it wrote none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, L) prompts -> (B, new_tokens) greedy continuations: one prefill into a DynamicCache, then a token a step."""
    device = next(model.parameters()).device
    cache = kvcache.new_cache(model)
    out = model(input_ids=ids.to(device), cache=cache, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1).cpu()


def stop_ids(model, tokenizer) -> set[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation_config eos ids (an int or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list | tuple) else ({eos} if eos is not None else set())
    return ids


def until_stop(row: torch.Tensor, stops: set[int]) -> list[int]:
    """A continuation up to (without) its first stop token: what a model writes after ending its answer is not its
    answer (digits written past EOS were scored)."""
    tokens = row.tolist()
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def resolve_lengths(settings: PasskeySettings, max_len: int) -> list[int]:
    """The prompt lengths to test: as given (each must leave room for the answer in the window) or the default."""
    if settings.lengths is None and not max_len:
        raise ClakitError("the model's config has no max_position_embeddings; give --passkey-lengths")
    lengths = settings.lengths or default_lengths(max_len)
    too_long = [n for n in lengths if max_len and n + 5 + EXTRA_TOKENS > max_len]
    if too_long:
        raise ClakitError(
            f"--passkey-lengths {too_long[0]} plus the answer ({5 + EXTRA_TOKENS} tokens) exceeds the model's "
            f"window of {max_len} tokens; use lengths up to {max_len - 5 - EXTRA_TOKENS}"
        )
    return sorted(set(lengths))


def unique_depths(depths: list[float]) -> list[float]:
    """Each depth once, as a float, in order: "0.5,0.5" would run the same prompts twice and count them twice, and
    the depth 0 vs 0.0 (or -0.0) would seed different prompts (the seed string holds the depth) under equal
    settings."""
    return sorted({float(d) + 0.0 for d in depths})  # + 0.0: -0.0 is 0.0, not a seed string of its own


@dataclass
class Prepared:
    settings: PasskeySettings
    lengths: list[int]
    cells: list[list[Prompt]]  # one list of `samples` prompts per (length, depth), lengths outer


def _check_window_fits(builder: PromptBuilder, longest: int, max_len: int) -> None:
    fixed = builder.fixed("0" * 5)
    if longest < fixed:
        raise ClakitError(
            f"the model's window of {max_len} tokens is too short for a passkey prompt ({fixed} tokens without "
            f"filler with this tokenizer, plus {5 + EXTRA_TOKENS} for the answer); drop --task passkey"
        )


def prepare(tokenizer, filler_text: "str | list[corpus.Text]", settings: PasskeySettings, max_len: int) -> Prepared:
    """Check the settings and build every prompt (before any model is loaded: bad settings fail in seconds)."""
    settings.check()
    settings = replace(settings, depths=unique_depths(settings.depths))
    lengths = resolve_lengths(settings, max_len)
    builder = PromptBuilder(tokenizer, filler_text, max(lengths))
    if settings.lengths is None:  # defaulted: a too-short prompt is the window's fault, not a flag never given
        _check_window_fits(builder, max(lengths), max_len)
    cells = [
        [builder.build(length, depth, s, settings.seed) for s in range(settings.samples)]
        for length in lengths
        for depth in settings.depths
    ]
    return Prepared(settings, lengths, cells)


def prompts_sha256(prepared: Prepared) -> str:
    """sha256 of every prompt's token ids, in order: two reports asked the same prompts only when it is equal (the
    settings alone do not say it: the filler comes from the evaluation text past what perplexity scores)."""
    digest = hashlib.sha256()
    for prompts in prepared.cells:
        for p in prompts:
            digest.update(len(p.ids).to_bytes(8, "little") + p.ids.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _answers(model, prompts: list[Prompt], batch_size: int | None) -> torch.Tensor:
    """Greedy continuations of one cell's prompts, `batch_size` at a time (eval's --batch-size: a cell of 10
    samples at 32k tokens was one 10 x 32k prefill)."""
    step = batch_size or len(prompts)
    outs = [greedy(model, torch.stack([p.ids for p in prompts[i : i + step]]), 5 + EXTRA_TOKENS)
            for i in range(0, len(prompts), step)]  # fmt: skip
    return torch.cat(outs)


def run(model, tokenizer, prepared: Prepared, quiet: bool = True, batch_size: int | None = None) -> dict:
    """Accuracy per (length, depth) cell and overall, with every prompt's key and answer; see the module docstring.
    `batch_size`: prompts per forward (None: a cell's samples at once)."""
    from tqdm.auto import tqdm

    cells, records = [], []
    stops = stop_ids(model, tokenizer)
    for prompts in tqdm(prepared.cells, desc="passkey", disable=quiet):
        out = _answers(model, prompts, batch_size)
        texts = tokenizer.batch_decode([until_stop(row, stops) for row in out], skip_special_tokens=True)
        correct = [answer(t) == p.key for t, p in zip(texts, prompts, strict=True)]
        length, depth = prompts[0].length, prompts[0].depth
        cells.append({"length": length, "depth": depth, "accuracy": sum(correct) / len(correct),
                      "correct": sum(correct), "samples": len(correct)})  # fmt: skip
        records += [{"length": length, "depth": depth, "sample": p.sample, "key": p.key, "output": t, "correct": c}
                    for p, t, c in zip(prompts, texts, correct, strict=True)]  # fmt: skip
    s = prepared.settings
    return {
        "accuracy": sum(c["correct"] for c in cells) / sum(c["samples"] for c in cells),
        "cells": cells,
        "settings": {
            "lengths": prepared.lengths,
            "depths": list(s.depths),
            "samples": s.samples,
            "seed": s.seed,
            "new_tokens": 5 + EXTRA_TOKENS,
        },  # fmt: skip
        "prompts_sha256": prompts_sha256(prepared),
        "prompts": records,
    }
