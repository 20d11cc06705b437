"""Sliding-window perplexity, word perplexity and bits per byte.

Definition (transformers' "Perplexity of fixed-length models", stated on (input, target) pairs):
the token sequence is x_0 .. x_{N-1}, where x_0 is a prefix token (BOS, else EOS, as lm-evaluation-harness
prepends) when the tokenizer has one, so every token of the text is predicted (without one, x_0 is the text's first
token, context only, and the word and byte counts below leave its text out). Target x_i (i >= 1) is predicted from
the tokens before it inside a window of at most `seq_len` model inputs. Windows start every `stride` tokens; each
window scores only the targets no earlier window scored (its last `stride` targets; the first window scores all of
its `seq_len`), so every token after the first is scored exactly once, with at least `seq_len - stride` tokens of
context once the text is longer than one window.

    perplexity      = exp(sum NLL / number of scored tokens)
    word_perplexity = exp(sum NLL / number of words)               (words: re.split(r"\\s+", text), as lm-eval)
    bits_per_byte   = sum NLL / (number of UTF-8 bytes * ln 2)     (lm-eval's bits_per_byte)

`stride == seq_len` (the default) gives disjoint windows, which is lm-eval's rolling loglikelihood (context_len=1);
a smaller stride gives every prediction more context and a lower perplexity.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clakit.corpus import Text, head, join_texts
from clakit.errors import ClakitError

DEFAULT_SEQ_LEN = 1024  # tokens per window (clakit eval, the `evaluate` metric), unless the model's context is shorter


@dataclass(frozen=True)
class Window:
    start: int  # first model input (index into the token sequence)
    end: int  # one past the last model input; the window predicts targets start+1 .. end
    scored: int  # how many of its last targets are scored (the rest are context)


@dataclass(frozen=True)
class TokenizedText:
    ids: torch.Tensor  # (N,) int64: prefix token (if any) + the text's tokens
    text: str  # exactly the text the scored targets cover (for word and byte counts)


def check_window(seq_len: int, stride: int | None) -> int:
    """The effective stride; refuses non-positive values and stride > seq_len (tokens would go unscored)."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ClakitError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or stride <= 0:
        raise ClakitError(f"--stride must be a positive number of tokens, got {stride}")
    if stride > seq_len:
        raise ClakitError(f"--stride ({stride}) must not exceed --seq-len ({seq_len}): tokens would go unscored")
    return stride


def windows(num_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows over N tokens scoring targets 1 .. N-1 exactly once (see the module docstring)."""
    out, scored_to = [], 0  # targets 1 .. scored_to are done
    last_target = num_tokens - 1
    first_end = min(seq_len, last_target)
    for end in [first_end, *range(first_end + stride, last_target + stride, stride)]:
        end = min(end, last_target)
        if end <= scored_to:
            break
        start = max(0, end - seq_len)
        out.append(Window(start, end, end - scored_to))
        scored_to = end
    return out


def prefix_token_id(tokenizer) -> int | None:
    """lm-eval's prefix token: BOS, else EOS (so the text's first token is predicted too)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], enc["offset_mapping"]
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], None


def tokenize(tokenizer, text: "str | list[Text]", max_tokens: int | None = None) -> TokenizedText:
    """The text's tokens and the exact text they cover: at most `max_tokens` scored ones, so without a prefix token
    one more (the first, context only: `--max-tokens` = `--seq-len` was refused as a text too short for a window).
    `text`: a str, or texts read as corpus.join_texts joins them, only as far as `max_tokens` needs."""
    prefix = prefix_token_id(tokenizer)
    keep = None if max_tokens is None else max_tokens + (prefix is None)
    text, ids, offsets = _read_enough(tokenizer, [Text("<text>", text)] if isinstance(text, str) else text, keep)
    if keep is not None and len(ids) > keep:
        ids = ids[:keep]
        text = text[: offsets[keep - 1][1]] if offsets else tokenizer.decode(ids)
    if prefix is None:  # nothing predicts the first token: its bytes and words are not the scored text's
        text = _after_first_token(tokenizer, text, ids, offsets)
    ids = ([prefix] if prefix is not None else []) + list(ids)
    return TokenizedText(torch.tensor(ids, dtype=torch.long), text)


def _read_enough(tokenizer, texts: list[Text], keep: int | None) -> tuple[str, list[int], list | None]:
    """(text, its ids, offsets): all of the texts, or a head of them holding more than keep + 1 tokens, read no
    further: cut at 16 characters a token, then 4x longer while too few tokens came (text without spaces, a run of
    one character). A 2 GB file for 8,192 tokens reads ~128 KB, where it was read and tokenised whole."""
    if keep is None:
        text = join_texts(texts)
        return text, *_encode(tokenizer, text)
    chars = 16 * keep + 1024
    while True:
        text = head(texts, chars + 1)  # one more character tells whether there is more
        if len(text) <= chars:
            return text, *_encode(tokenizer, text)
        ids, offsets = _encode(tokenizer, text[:chars])
        if len(ids) > keep + 1:
            # the cut may fall inside a word, whose pieces are other tokens than the whole word's (a text of ~17
            # characters a token scored " agf" for " agfwdpgxzbvarntd" at --max-tokens 1030): the first `keep` ids
            # are taken once a cut a quarter shorter gives them too
            if _encode(tokenizer, text[: chars * 3 // 4])[0][:keep] == ids[:keep]:
                return text[:chars], ids, offsets
            chars *= 2
        else:
            chars *= 4


def _after_first_token(tokenizer, text: str, ids: list[int], offsets) -> str:
    """The text the targets cover when the first token is only context (a tokenizer without BOS and EOS)."""
    if not ids:
        return text
    if offsets:
        return text[offsets[0][1] :]
    first = tokenizer.decode(ids[:1])
    return text[len(first) :] if text.startswith(first) else text


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval's word count (wikitext word_perplexity)


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def batches(wins: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal input length, `batch_size` at a time (only the last window is shorter)."""
    out: list[list[Window]] = []
    for w in wins:
        if out and len(out[-1]) < batch_size and out[-1][0].end - out[-1][0].start == w.end - w.start:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _batch_nll(model, ids: torch.Tensor, batch: list[Window], device) -> float:
    """Sum of NLL over the scored targets of one batch of equal-length windows."""
    inputs = torch.stack([ids[w.start : w.end] for w in batch]).to(device)  # (B, L)
    keep = max(w.scored for w in batch)
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits  # (B, keep, V)
    total = 0.0
    for row, w in enumerate(batch):
        targets = ids[w.end - w.scored + 1 : w.end + 1].to(logits.device)  # (scored,); a device map may end elsewhere
        total += _nll_sum(logits[row, keep - w.scored :], targets)
    return total


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> float:
    """Sum of NLL of (n, V) logits in fp32, `chunk` rows at a time: a (64, V) log-softmax stays in cache, which
    measured ~3x faster on CPU than one (512, 49152) pass (and bounds the fp32 copy of bf16 logits)."""
    return sum(
        F.cross_entropy(logits[i : i + chunk].float(), targets[i : i + chunk], reduction="sum").item()
        for i in range(0, len(targets), chunk)
    )


def no_grad_for(model):
    """inference_mode, except for a model sharded by FSDP (uptrain's reports): FSDP2 would keep the layers'
    gathered weights as inference tensors, which training then cannot write ("Inplace update to inference tensor")."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    sharded = any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())
    return torch.no_grad() if sharded else torch.inference_mode()


def score(model, ids: torch.Tensor, seq_len: int, stride: int, batch_size: int = 4, quiet: bool = False) -> dict:
    """Sum of NLL (nats) over every target of `ids` (N,), sliding windows batched; deterministic on CPU."""
    from tqdm.auto import tqdm

    wins = windows(len(ids), seq_len, stride)
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    bar = tqdm(total=sum(w.scored for w in wins), unit="tok", unit_scale=True, desc="perplexity", disable=quiet)
    with no_grad_for(model), bar:
        for batch in batches(wins, batch_size):
            nll += _batch_nll(model, ids, batch, device)
            scored = sum(w.scored for w in batch)
            n += scored
            bar.update(scored)
    return {"nll_sum": nll, "num_scored": n, "num_windows": len(wins)}


def _window_nll_cached(model, ids: torch.Tensor, w: Window, cache, chunk: int, device) -> float:
    """One window fed `chunk` inputs at a time into `cache`: (chunk, V) logits per step, NLL of the scored ones."""
    total = 0.0
    first_scored = w.end - w.scored  # input position whose logits predict the first scored target
    for start in range(w.start, w.end, chunk):
        stop = min(start + chunk, w.end)
        logits = model(input_ids=ids[start:stop].unsqueeze(0).to(device), cache=cache, use_cache=True).logits
        lo = max(start, first_scored)
        if lo < stop:
            total += _nll_sum(logits[0, lo - start :], ids[lo + 1 : stop + 1].to(logits.device))
    return total


def score_cached(
    model, ids: torch.Tensor, seq_len: int, stride: int, new_cache, chunk: int = 16, quiet: bool = False
) -> dict:
    """`score` with each window run through a fresh cache from `new_cache()`, `chunk` inputs per forward (as in
    decoding, chunk 1, or chunked prefill): every prediction attends to what the cache *stores* for the earlier
    chunks (a quantised cache's dequantised K/V) and to its own chunk as computed. Same windows, same targets, so
    with a `DynamicCache` it gives `score`'s number (tested)."""
    from tqdm.auto import tqdm

    if not isinstance(chunk, int) or chunk <= 0:
        raise ClakitError(f"the chunk length must be a positive number of tokens, got {chunk}")
    wins = windows(len(ids), seq_len, stride)
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    bar = tqdm(total=sum(w.scored for w in wins), unit="tok", unit_scale=True, desc="perplexity", disable=quiet)
    with torch.inference_mode(), bar:
        for w in wins:
            nll += _window_nll_cached(model, ids, w, new_cache(), chunk, device)
            n += w.scored
            bar.update(w.scored)
    return {"nll_sum": nll, "num_scored": n, "num_windows": len(wins)}


def _exp_or_none(x: float) -> float | None:
    """exp(x), or None past a float's range: text without whitespace (Chinese, code) has a handful of "words" for
    thousands of tokens, so its word perplexity exceeds 1.8e308 (exp of more than 709.78)."""
    try:
        return math.exp(x)
    except OverflowError:
        return None


def metrics(nll_sum: float, num_scored: int, text: str) -> dict:
    """Token perplexity, word perplexity and bits per byte (lm-eval definitions) from a summed NLL in nats."""
    return {
        "perplexity": math.exp(nll_sum / num_scored),
        "word_perplexity": _exp_or_none(nll_sum / count_words(text)),
        "bits_per_byte": nll_sum / (count_bytes(text) * math.log(2)),
        "nll_per_token": nll_sum / num_scored,
        "num_words": count_words(text),
        "num_bytes": count_bytes(text),
    }


def _model_windows(model, seq_len: int | None, stride: int | None) -> tuple[int, int]:
    """(seq_len, stride) resolved and checked against `model`'s context window."""
    from clakit.sources import check_seq_len, default_seq_len

    config = getattr(model, "config", None)  # a wrapper without one has no window to hold seq_len to
    seq_len = default_seq_len(config, DEFAULT_SEQ_LEN) if seq_len is None else seq_len
    stride = check_window(seq_len, stride)
    check_seq_len(seq_len, config, "seq_len")
    return seq_len, stride


def _check_one_window(tokens, seq_len: int) -> None:
    """The text must fill one window of model inputs (its ids hold the prefix token: one more than the inputs)."""
    if len(tokens.ids) - 1 < seq_len:
        raise ClakitError(
            f"the text has {len(tokens.ids) - 1} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )


def perplexity(
    model,
    tokenizer,
    text: "str | list[Text]",
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    quiet: bool = True,
) -> dict:
    """Perplexity, word perplexity and bits per byte of an already-loaded causal LM on `text` (a str, or texts read
    only as far as `max_tokens` needs: `tokenize`). `seq_len` defaults to
    1024, or the model's context window when shorter; above the window it is refused, as by `clakit eval` (the
    `evaluate` module's default 1024 scored a 64-token-window model at positions it never saw, and a learned-position
    model raised IndexError)."""
    seq_len, stride = _model_windows(model, seq_len, stride)
    tokens = tokenize(tokenizer, text, max_tokens)
    _check_one_window(tokens, seq_len)
    scored = score(model, tokens.ids, seq_len, stride, batch_size, quiet)
    return {
        **metrics(scored["nll_sum"], scored["num_scored"], tokens.text),
        "num_tokens": scored["num_scored"],
        "num_windows": scored["num_windows"],
        "seq_len": seq_len,  # the windows used, defaults resolved: the number means nothing without them
        "stride": stride,
    }
