"""Training data: texts tokenised, packed into `seq_len` blocks, split into train and held-out, served in a
deterministic order that a resumed run can continue from any step."""

from dataclasses import dataclass
from pathlib import Path

import torch

from clakit.copies import add_copies
from clakit.corpus import SEPARATOR, Text, load_texts, near_copy, shared_text
from clakit.errors import ClakitError
from clakit.eval.lineage import readable
from clakit.paths import expand
from clakit.uptrain.recipe import calibrated_tail

_PIECE_CHARS = 1 << 20  # tokenise long texts in ~1 MB pieces (cut at line ends) to bound tokenizer memory


@dataclass
class PackedData:
    train: torch.Tensor  # (n_train_blocks, seq_len) int64 token ids
    eval: torch.Tensor  # (n_eval_blocks, seq_len) int64 token ids, never trained on
    train_sources: list[str]
    eval_sources: list[str]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def _pieces(text: Text, size: int = _PIECE_CHARS):
    """`text` in pieces of about `size` characters cut at line ends, read as they are taken (a budget stops early;
    a file is never held whole); yields (piece, is_last)."""
    reader, buffer, done = text.pieces(size), "", False
    while True:
        while not done and len(buffer) <= size:  # more than `size` read, or all: whether the rest is one piece
            more = next(reader, None)
            done, buffer = more is None, buffer + (more or "")
        if len(buffer) <= size:
            if buffer:
                yield buffer, True
            return
        end = buffer.rfind("\n", 0, size) + 1
        if end == 0:  # a line longer than a piece (a dump without line ends): cut where a word starts, not inside it
            end = max(buffer.rfind(" ", 0, size), 0) or size
        yield buffer[:end], False
        buffer = buffer[end:]


def tokenize(tokenizer, texts: list[Text], limit: int | None = None) -> torch.Tensor:
    """One stream of token ids, each document preceded by BOS where the tokenizer adds one itself (document_start)
    and followed by EOS (without one, by SEPARATOR's tokens); (n_tokens,) int64.

    Pieces are kept as int32 tensors (a Python list of ints costs ~9x more); `limit` stops once that many tokens
    are read, so a token budget never tokenises a whole large dataset.
    """
    parts, n = [], 0
    # without an EOS token the documents are separated as eval joins them (SEPARATOR): run together, the end of one
    # and the start of the next read as one word
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else _separator(tokenizer)
    bos = document_start(tokenizer)
    size = _PIECE_CHARS if limit is None else min(_PIECE_CHARS, max(4096, 8 * limit))  # ~4 chars a token
    for t in texts:
        for i, (piece, last) in enumerate(_pieces(t, size)):
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids = (bos if i == 0 else []) + ids + (eos if last else [])
            parts.append(torch.tensor(ids, dtype=torch.int32))
            n += len(ids)
            if limit is not None and n >= limit:
                return torch.cat(parts).long()
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def _separator(tokenizer) -> list[int]:
    return tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]


def document_start(tokenizer) -> list[int]:
    """[BOS] where the tokenizer itself starts every text with it (Llama-2's and Mistral's add_bos_token, Llama-3's
    post-processor): the models of those families were pretrained on BOS doc EOS, and every prompt they are given
    (clakit eval's and lm-eval's prefix, a chat template) starts with BOS; [] for tokenizers that add none
    (SmolLM2, Qwen: EOS alone separates their documents)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize_shares(tokenizer, texts: list[Text], limit: int | None = None) -> torch.Tensor:
    """`tokenize`, but a `limit` is shared among the texts in proportion to their characters, so a budget smaller
    than the data reads the same mix as the whole data would (with one head-read stream, the first large file
    would fill the budget and the others would never be trained on); (n_tokens,) int64."""
    if limit is None or len(texts) < 2:
        return tokenize(tokenizer, texts, limit)
    total = sum(t.chars() for t in texts)  # a file's characters are counted reading it through, in bounded memory
    eos = tokenizer.eos_token_id
    shares = []
    for t in texts:
        ids = tokenize(tokenizer, [t], max(1, -(-limit * t.chars() // total)))
        if eos is not None and ids.numel() and ids[-1] != eos:  # a share cut short still ends its document
            ids = torch.cat([ids, torch.tensor([eos])])
        shares.append(ids)
    return torch.cat(shares)


def blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n_tokens,) -> (n_tokens // seq_len, seq_len); the ragged tail is dropped."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def _too_short(what: str, n_tokens: int, seq_len: int) -> ClakitError:
    return ClakitError(
        f"{what} has {n_tokens} tokens, fewer than one sequence of data.seq_len={seq_len}; "
        "give more text or lower data.seq_len"
    )


FITTED_BEFORE = "text model.path was fitted on before"  # as its records name it: conversion, earlier uptraining


def build_data(
    data,
    tokenizer,
    train_tokens: int | None = None,
    seed: int = 0,
    calib: list[str] | None = None,
    before=None,
) -> PackedData:
    """Tokenise and pack a recipe's `data` section. `train_tokens` (the run's token budget, when known) bounds the
    train text read; the held-out blocks are capped at `eval_max_tokens` and never get copies. `calib`: the
    conversion's calibration specs (model.convert.calib_data), which data.eval must not hold either; `before`: the
    local files the start checkpoint was fitted on before (student.FittedBefore), nor those."""
    every = readable(before.every) if before else []
    whole = [t for t in every if _inside(t.name, before.whole)] if before else []
    train_texts, eval_texts, eval_sources = _split_texts(data, calib, every, whole)
    # both streamed: only as many tokens as the budget / the held-out cap need are ever tokenised
    train_ids = tokenize_shares(tokenizer, train_texts, train_tokens)
    eval_ids = tokenize(tokenizer, eval_texts, data.eval_max_tokens + data.seq_len)
    train, held = _packed(train_ids, eval_ids, data.seq_len)
    held = held[: max(1, data.eval_max_tokens // data.seq_len)]
    train = add_copies(train, data.copy_fraction, data.copy_span, seed)
    return PackedData(train, held, [t.name for t in train_texts], eval_sources)


def _inside(name: str, paths: list[str]) -> bool:
    """Whether file `name` is one of `paths` or in one of them (a recorded folder: the files it reads)."""
    return any(Path(name).is_relative_to(p) for p in paths)  # a path is relative to itself


def _split_texts(data, calib: list[str] | None, before: list[Text], whole_before: list[Text]) -> tuple:
    """(train texts, held-out texts, the held-out sources as the card names them): data.eval, or the tail of the
    train text, checked against the train and calibration text it must not hold."""
    train_texts = load_texts(data.train, "data.train")
    # a datasets spec: the path rule (recipe._check_calibration_held_out)
    local_calib = [c for c in calib or [] if expand(c, "model.convert.calib_data").exists()]
    calib_texts = load_texts(local_calib, "model.convert.calib_data") if local_calib else []
    if data.eval:
        eval_texts = load_texts(data.eval, "data.eval")
        fitted = {"data.train": train_texts, "calibration text": calib_texts, FITTED_BEFORE: before}
        check_held_out(eval_texts, fitted)
        return train_texts, eval_texts, [t.name for t in eval_texts]
    # hold out the tail of the train text: contiguous, so no block straddles train and eval
    texts, (train_texts, eval_texts) = train_texts, split_tail(train_texts, data.eval_fraction)
    tail = {t.name for t in eval_texts}
    whole = [t for t in texts if t.name in tail]  # the files the held-out tail was cut from, whole
    others = [t for t in texts if t.name not in tail]
    check_tail_not_calibrated(whole, calib_texts, data.eval_fraction)
    check_tail_not_fitted_before(whole, whole_before, data.eval_fraction)
    check_tail_not_trained(whole, others)
    fitted = {"data.train": others, "calibration text": calib_texts, FITTED_BEFORE: whole_before}
    check_not_near_copy(eval_texts, fitted, "the held-out tail")
    return train_texts, eval_texts, [f"last {data.eval_fraction:g} of data.train"]


def _packed(train_ids, eval_ids, seq_len: int) -> tuple:
    """(train blocks, held-out blocks) of seq_len tokens; a text too short for one block is refused naming it."""
    train, held = blocks(train_ids, seq_len), blocks(eval_ids, seq_len)
    if len(train) == 0:
        raise _too_short("data.train", train_ids.numel(), seq_len)
    if len(held) == 0:
        what = "the held-out data (data.eval, or data.eval_fraction of data.train)"
        raise _too_short(what, eval_ids.numel(), seq_len)
    return train, held


def check_held_out(held: list[Text], fitted: dict[str, list[Text]]) -> None:
    """data.eval, refused when it copies a file the model is fitted on (check_not_copied) or is mostly text it is
    fitted on (check_not_near_copy)."""
    check_not_copied(held, fitted)
    check_not_near_copy(held, fitted, "data.eval")


def check_not_copied(held: list[Text], fitted: dict[str, list[Text]]) -> None:
    """A held-out file with the same text as a file the model is fitted on (`fitted`: training, calibration), a copy
    under another name that the recipe's path rule cannot see, is no held-out text: its numbers would measure
    memorisation. Refused by content."""
    for what, texts in fitted.items():
        found = shared_text(held, texts)
        if found is not None:
            raise ClakitError(
                f"data.eval {found[0].name} holds the same text as {what} {found[1]}: its numbers would not be held "
                "out; give text the model is not fitted on, or drop data.eval to hold out the end of the train text"
            )


def check_not_near_copy(held: list[Text], fitted: dict[str, list[Text]], what: str) -> None:
    """Held-out text most of whose long lines the model is fitted on (a half of a training file, a file plus a
    line: `corpus.near_copy`, judged on the held-out texts together), which the exact comparison passes. `what`:
    data.eval, or the held-out tail (compared with the other files only: a file's tail against its own head is the
    data's business)."""
    found = near_copy(held, fitted)
    if found is not None:
        raise ClakitError(
            f"{what} is mostly text the model is fitted on ({found[1].text(found[0])}): its numbers would not be "
            "held out; give text the model is not fitted on"
        )


def check_tail_not_calibrated(train: list[Text], calib: list[Text], fraction: float) -> None:
    """With data.eval_fraction the held-out text is the tail of data.train: a calibration file holding the same text
    as a train file the tail was cut from (`train`: those files, whole; the same file inside a folder, or a copy
    under another name, which the recipe's path rule cannot see) fits the conversion on it. Refused by content, as
    check_held_out refuses a copied data.eval; calibration on the train files before the tail is allowed."""
    found = shared_text(calib, train)
    if found is not None:
        raise ClakitError(calibrated_tail(found[0].name, found[1], fraction))


def check_tail_not_fitted_before(train: list[Text], before: list[Text], fraction: float) -> None:
    """The held-out tail cut from a train file whose text the start checkpoint was fitted on before (its
    conversion's calibration, an earlier uptraining's training text): its numbers would not be held out."""
    found = shared_text(before, train)
    if found is not None:
        raise ClakitError(
            f"the held-out text (the last data.eval_fraction={fraction:g} of data.train) is cut from {found[1]}, "
            f"{FITTED_BEFORE} (as {found[0].name}, named in its records): its numbers would not be held out; give "
            "held-out text as data.eval"
        )


def check_tail_not_trained(tail: list[Text], others: list[Text]) -> None:
    """A file the held-out tail is cut from, also in data.train under another name (a link, a copy, a folder holding
    it): the tail is then trained on through the other one, and its numbers are not held out. Refused by content."""
    found = shared_text(tail, others)
    if found is not None:
        raise ClakitError(
            f"data.train holds the text of {found[0].name} twice (also as {found[1]}): the held-out tail cut from it "
            "(data.eval_fraction) would be trained on through the other; give each text once, or give data.eval"
        )


def split_tail(texts: list[Text], fraction: float) -> tuple[list[Text], list[Text]]:
    """(head, tail) of the texts' concatenation, cut at (1 - fraction) of its characters (at the next line end
    when one is near), without tokenising anything."""
    cut, seen = int(sum(t.chars() for t in texts) * (1 - fraction)), 0
    head, tail = [], []
    for t in texts:
        n = t.chars()
        at = min(max(cut - seen, 0), n)
        if 0 < at < n:
            line_end = t.part(at, at + 4096).text.find("\n")
            at = at + line_end + 1 if line_end >= 0 else at
        head += [t.part(0, at)] if at > 0 else []
        tail += [t.part(at)] if at < n else []  # a file's part is read when tokenised, not here
        seen += n
    return head, tail


class BatchOrder:
    """Which train blocks micro-batch `g` of process `rank` reads: a fresh seeded shuffle per epoch.

    The order is a pure function of (seed, position), so resuming needs only the step counter, and every process
    of a multi-GPU run reads disjoint blocks without a DistributedSampler.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n_blocks, batch_size, seed, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch's permutation
        return self._perms[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        start = (micro_batch * self.world + self.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]
