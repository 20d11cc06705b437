"""A small held-out perplexity, printed by `clakit convert --eval-data` before and after the conversion."""

import torch

from clakit.corpus import Text, join_texts
from clakit.errors import ClakitError


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[Text], max_tokens: int = 8192, seq_len: int = 512) -> float:
    """exp(mean next-token loss) over the first `max_tokens` tokens of `texts`, cut into windows of `seq_len`.

    Windows do not overlap (each starts without context): cheap, and the same for both models being compared.
    """
    ids = tokenizer(join_texts(texts), return_tensors="pt", verbose=False).input_ids[0, :max_tokens]  # (n,)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start : start + seq_len].unsqueeze(0)  # (1, <=seq_len)
        if window.shape[1] < 2:
            break
        loss = model(input_ids=window, labels=window).loss  # mean over window.shape[1] - 1 predictions
        total += loss.item() * (window.shape[1] - 1)
        count += window.shape[1] - 1
    if count == 0:
        raise ClakitError("the --eval-data text is shorter than two tokens; give more held-out text")
    return float(torch.tensor(total / count).exp())
