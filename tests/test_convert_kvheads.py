"""KV-head merging (the per-layer baseline to CLA): exact where the merged heads are equal, the cache shrinks by the
merge ratio, the fitted values reconstruct better than the mean on the calibration inputs, bad requests refused."""

import pytest
import torch
from conftest import tiny_model
from device_mix import DeviceMix

from clakit.convert import kvheads
from clakit.convert.inmemory import cla_model_from
from clakit.errors import ClakitError
from clakit.eval import kvcache


def with_equal_kv_heads(model):
    """Copy KV head 0 onto every KV head (k, v): merging them loses nothing."""
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            d = proj.weight.shape[0] // model.config.num_key_value_heads
            with torch.no_grad():
                proj.weight.copy_(proj.weight[:d].repeat(model.config.num_key_value_heads, 1))
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 300, (4, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["mean", "fitted"])
def test_merging_equal_heads_is_exact(ids, method):
    model = with_equal_kv_heads(tiny_model("llama", num_key_value_heads=4, num_attention_heads=4))
    for m in (4, 2, 1):
        merged = kvheads.merge_kv_heads(model, m, method, calib_ids=ids)
        assert merged.config.num_key_value_heads == m and model.config.num_key_value_heads == 4
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_cache_shrinks_by_the_merge_ratio(ids, kind):
    model = tiny_model(kind, num_key_value_heads=2)
    merged = kvheads.merge_kv_heads(model, 1)
    assert kvcache.measured_bytes(merged, ids[:1]) * 2 == kvcache.measured_bytes(model, ids[:1])
    assert kvcache.bytes_per_token(merged.config, torch.float32) * 2 == kvcache.bytes_per_token(
        model.config, torch.float32
    )


def value_error(model, merged, ids) -> float:
    """Squared error, on `ids`, of every query head's value contribution to o_proj's output against the original."""
    moments = kvheads.input_moments(model, ids)
    total = 0.0
    for i, (a, b) in enumerate(zip(model.model.layers, merged.model.layers, strict=True)):
        heads, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        per_kv = heads // model.config.num_key_value_heads
        per_new = heads // merged.config.num_key_value_heads
        for q in range(heads):
            wo_a, wo_b = (
                a.self_attn.o_proj.weight[:, q * d : (q + 1) * d],
                b.self_attn.o_proj.weight[:, q * d : (q + 1) * d],
            )
            va = a.self_attn.v_proj.weight[(q // per_kv) * d : (q // per_kv + 1) * d]
            vb = b.self_attn.v_proj.weight[(q // per_new) * d : (q // per_new + 1) * d]
            diff = (wo_a @ va - wo_b @ vb).double()  # (hidden, hidden): the map from attention input to output
            total += torch.trace(diff @ moments[i] @ diff.T).item()
    return total


def test_fitted_heads_reconstruct_better_than_the_mean(ids):
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=4)
    mean, fitted = (kvheads.merge_kv_heads(model, 1, m, calib_ids=ids) for m in ("mean", "fitted"))
    assert value_error(model, fitted, ids) < 0.8 * value_error(model, mean, ids)
    err = {
        name: (m(ids).logits - model(ids).logits).pow(2).mean().item() for name, m in [("mean", mean), ("fit", fitted)]
    }
    assert err["fit"] < 0.8 * err["mean"]


def test_fitted_keys_undo_a_complex_scale_per_rope_frequency(ids):
    """KV heads whose keys differ from head 0's by a complex scalar per RoPE frequency (a rotation and scaling of each
    (f, f + d/2) pair) and whose values are equal merge exactly with `fitted` (queries absorb the scalars through
    RoPE), not with the mean."""
    model = with_equal_kv_heads(tiny_model("llama", num_key_value_heads=4, num_attention_heads=4))
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        w = layer.self_attn.k_proj.weight  # (4 heads * 12, hidden); pairs (f, f + 6)
        with torch.no_grad():
            for p in range(1, 4):
                a, b = torch.randn(2, 6, 1, generator=gen)
                x, y = w[:6].clone(), w[6:12].clone()
                w[p * 12 : p * 12 + 6], w[p * 12 + 6 : p * 12 + 12] = a * x - b * y, b * x + a * y
    mean, fitted = (kvheads.merge_kv_heads(model, 1, m, calib_ids=ids) for m in ("mean", "fitted"))
    torch.testing.assert_close(fitted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert (mean(ids).logits - model(ids).logits).abs().max() > 0.1


@pytest.mark.parametrize(
    ("heads", "method", "needle"),
    [(3, "mean", "positive divisor of the model's 2 KV heads"), (0, "mean", "positive divisor"),
     (1, "pca", "must be one of mean, fitted"), (1, "fitted", "needs calibration data")],
)  # fmt: skip
def test_bad_requests_are_refused_in_one_line(heads, method, needle):
    with pytest.raises(ClakitError, match=needle) as e:
        kvheads.merge_kv_heads(tiny_model("llama"), heads, method)
    assert "\n" not in str(e.value)


def test_cla_models_are_refused():
    with pytest.raises(ClakitError, match="merge KV heads on the stock model, then convert"):
        kvheads.merge_kv_heads(cla_model_from(tiny_model("llama"), [0, 0, 2, 2]), 1)



def test_the_fit_follows_the_weights_device(ids):
    """The fit runs where the weights are (a GPU in practice; `meta` stands here for any device other than the
    CPU's moments): the old code multiplied the weights by the CPU moments (same-device error on a GPU)."""
    moments = kvheads.input_moments(tiny_model("llama"), ids)  # on the CPU, where this model ran
    on_device = tiny_model("llama").to("meta")
    with DeviceMix():
        state = kvheads.merged_state(on_device, 1, moments)
    assert {t.device.type for t in state.values()} == {"meta"}
