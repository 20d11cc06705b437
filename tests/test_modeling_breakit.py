"""Break-it probes of the CLA model classes and of model loading (clakit/modeling, clakit/sources.py): each test
is a case that once went wrong, checked against what huggingface_hub, transformers or the stock model do."""

import pytest
from test_sources_hub import hub  # noqa: F401

from clakit.errors import ClakitError
from clakit.sources import resolve_source

# --- sources: Hub ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "false", "OFF", ""])
def test_hub_offline_set_to_a_false_value_still_downloads(hub, monkeypatch, value):  # noqa: F811
    """huggingface_hub reads HF_HUB_OFFLINE=0 (or false/off) as online; clakit took any non-empty value as offline
    and refused an id its cache lacked as "does not exist" without trying to download it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    source = resolve_source("org/model")
    assert source.kind == "dir" and (source.path / "config.json").is_file()
    assert hub.weights_fetched()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_offline_set_to_a_true_value_never_downloads(hub, monkeypatch, variable):  # noqa: F811
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(ClakitError, match="'org/model' does not exist"):
        resolve_source("org/model")
    assert hub.calls == []
