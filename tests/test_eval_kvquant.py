"""KV-cache quantisation baseline: perplexity through a real cache, chunk by chunk, and the bytes the quantised cache
holds (transformers' QuantizedCache, HQQ backend) against the computed figure, for stock and CLA models."""

import pytest
import torch
from conftest import make_text, tiny_model
from transformers import DynamicCache

from clakit.convert.inmemory import cla_model_from
from clakit.errors import ClakitError
from clakit.eval import kvquant, perplexity

GROUP = 6  # divides the tiny model's head_dim, 12: a group is part of one token's head


@pytest.fixture(scope="module")
def stock():
    return tiny_model("llama", max_position_embeddings=256)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return perplexity.tokenize(tokenizer, make_text(400, 41), max_tokens=300).ids


def quantized(model, nbits, chunk=16):
    return lambda: kvquant.QuantizedKVCache(model.config, nbits, q_group_size=GROUP, residual_length=chunk)


@pytest.mark.parametrize(("seq_len", "stride", "chunk"), [(64, 64, 16), (64, 40, 7), (300, 300, 1)])
def test_chunked_scoring_through_a_dynamic_cache_equals_the_one_pass_score(stock, ids, seq_len, stride, chunk):
    ref = perplexity.score(stock, ids, seq_len, stride, batch_size=2, quiet=True)
    got = perplexity.score_cached(stock, ids, seq_len, stride, lambda: DynamicCache(config=stock.config), chunk, True)
    assert (
        (got["num_scored"], got["num_windows"])
        == (ref["num_scored"], ref["num_windows"])
        == (len(ids) - 1,) + (ref["num_windows"],)
    )
    assert got["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-5)


def test_quantised_cache_changes_the_score_more_at_fewer_bits(stock, ids):
    full = perplexity.score(stock, ids, 64, 64, quiet=True)["nll_sum"]
    nll = {b: perplexity.score_cached(stock, ids, 64, 64, quantized(stock, b), 16, True)["nll_sum"] for b in (8, 4)}
    assert nll[8] != full  # the cache really stores quantised K/V
    assert abs(nll[8] - full) < abs(nll[4] - full) < 0.2 * full


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("layout", [None, [0, 0, 2, 2], [0, 1, 1, 1]])
def test_bytes_held_equal_the_computed_bytes_per_token(stock, ids, nbits, layout):
    model = cla_model_from(stock, layout) if layout else stock
    cache = quantized(model, nbits)()
    with torch.inference_mode():
        for start in range(0, 96, 16):  # 96 tokens, every chunk folded into the quantised store
            model(input_ids=ids[None, start : start + 16], cache=cache, use_cache=True)
    per_token = kvquant.bytes_per_token(model.config, nbits, torch.float32, GROUP)
    assert kvquant.held_bytes(cache) == per_token * 96
    producers = len(set(layout)) if layout else 4
    # integers (nbits per value) + fp32 scale and zero per group of 8, for K and V of 2 heads x 12 dims per producer
    assert per_token == producers * 2 * (24 * nbits / 8 + 2 * (24 // GROUP) * 4)


def test_a_residual_not_yet_folded_in_is_counted_at_full_precision(stock, ids):
    cache = kvquant.QuantizedKVCache(stock.config, 8, q_group_size=GROUP, residual_length=64)
    with torch.inference_mode():
        stock(input_ids=ids[None, :32], cache=cache, use_cache=True)  # the first update quantises all
        stock(input_ids=ids[None, 32:40], cache=cache, use_cache=True)  # 8 tokens kept in fp32
    residual = 4 * 2 * 24 * 8 * 4  # layers x (K, V) x width x tokens x fp32
    assert kvquant.held_bytes(cache) == kvquant.bytes_per_token(stock.config, 8, torch.float32, GROUP) * 32 + residual


@pytest.mark.parametrize(
    ("nbits", "group", "needle"),
    [
        (3, GROUP, "bits must be one of 8, 4"),
        (8, 7, "group size must divide head_dim = 12 \\(a group is part of one token's head\\), got 7; use 6 or"),
        (4, 0, "group size must divide head_dim = 12 .*, got 0; use 12 or"),
        # divides kv_heads x head_dim = 24 (accepted before) but not head_dim: its groups spanned two tokens
        (8, 8, "group size must divide head_dim = 12 .*, got 8; use 6 or"),
        (8, 64, "got 64; use 12 or"),
    ],
)
def test_bad_quantisation_settings_are_refused_in_one_line(stock, nbits, group, needle):
    with pytest.raises(ClakitError, match=needle) as e:
        kvquant.QuantizedKVCache(stock.config, nbits, q_group_size=group)
    assert "\n" not in str(e.value)


def test_sliding_window_models_are_refused(tokenizer):
    mistral = tiny_model("mistral")
    with pytest.raises(ClakitError, match="full attention only"):
        kvquant.QuantizedKVCache(mistral.config, 8, q_group_size=GROUP)


def test_4_bit_takes_any_token_count_where_a_token_holds_an_odd_number_of_groups(tokenizer):
    """SmolLM2's 3 KV heads x head_dim 64 at group 64: HQQ's 4-bit packer pairs rows of a group, and an odd token
    count gave an odd row count: RuntimeError "The size of tensor a (49) must match ... (50)" at every odd prompt
    length or decoding step (chunk 1). Now padded: each real token quantises as it does beside any other tokens (its
    groups are its own rows), the bytes held are the real tokens' (the computed figure), and scoring runs."""
    from transformers.cache_utils import HQQQuantizedLayer

    model = tiny_model("llama", num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256)
    group = model.config.head_dim  # 3 groups a token
    x = torch.randn(1, 3, 6, group)
    layers = [kvquant.EvenRowsHQQLayer(nbits=4, axis_key=1, axis_value=1, q_group_size=group) for _ in range(2)]
    stock_layer = HQQQuantizedLayer(nbits=4, axis_key=1, axis_value=1, q_group_size=group)
    for layer in (*layers, stock_layer):
        layer.lazy_initialization(x, x)
    odd = layers[0]._dequantize(layers[0]._quantize(x[:, :, :5].contiguous(), axis=1))  # 15 rows: failed before
    even = stock_layer._dequantize(stock_layer._quantize(x.contiguous(), axis=1))  # 18 rows: the library as it is
    assert odd.shape == (1, 3, 5, group) and torch.equal(odd, even[:, :, :5])
    assert torch.equal(layers[1]._dequantize(layers[1]._quantize(x.contiguous(), axis=1)), even)  # no padding
    ids = perplexity.tokenize(tokenizer, make_text(400, 41), max_tokens=100).ids
    cache = kvquant.QuantizedKVCache(model.config, 4, q_group_size=group, residual_length=1)
    got = perplexity.score_cached(model, ids, 33, 33, lambda: kvquant.QuantizedKVCache(
        model.config, 4, q_group_size=group, residual_length=1), 1, True)  # fmt: skip
    assert got["num_scored"] == len(ids) - 1 and torch.isfinite(torch.tensor(got["nll_sum"]))
    with torch.inference_mode():
        for start in range(0, 33, 11):  # 11 tokens at a time: an odd count folded in each time
            model(input_ids=ids[None, start : start + 11], cache=cache, use_cache=True)
    assert kvquant.held_bytes(cache) == kvquant.bytes_per_token(model.config, 4, torch.float32, group) * 33
