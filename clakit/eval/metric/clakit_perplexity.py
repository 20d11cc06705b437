"""clakit's sliding-window perplexity as a local `evaluate` module that takes an already-loaded model.

The Hub's `perplexity` metric reloads the model by id (so it cannot score an in-memory or CLA model, nor run
offline); this one scores the model object you pass:

    import evaluate
    from clakit.eval.metric import METRIC_PATH

    ppl = evaluate.load(METRIC_PATH)
    ppl.compute(predictions=[text_a, text_b], model=model, tokenizer=tokenizer, seq_len=1024, stride=512)
    # {'perplexity': ..., 'word_perplexity': ..., 'bits_per_byte': ..., 'num_tokens': ..., 'seq_len': 1024,
    #  'stride': 512 (the windows used, defaults resolved), ...}

The predictions are scored as one text (joined by blank lines), exactly as `clakit eval` scores its data; `seq_len`
defaults as there (1024, or the model's context window when shorter) and above the window is refused.
"""

import datasets
import evaluate

from clakit.eval.perplexity import perplexity

_DESCRIPTION = "Sliding-window perplexity, word perplexity and bits per byte of an in-memory causal LM (clakit)."
_INPUTS = "predictions: list of texts; model, tokenizer: loaded objects; seq_len, stride, max_tokens, batch_size."


class ClakitPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self, predictions, model=None, tokenizer=None, seq_len=None, stride=None, max_tokens=None, batch_size=4
    ):
        if model is None or tokenizer is None:
            raise ValueError("clakit_perplexity needs model= and tokenizer= (already loaded objects)")
        return perplexity(
            model,
            tokenizer,
            "\n\n".join(predictions),
            seq_len=seq_len,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
        )
