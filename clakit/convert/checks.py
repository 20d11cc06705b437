"""Checks of a source checkpoint's tensors against its config, run before anything is written."""

import torch

from clakit.errors import ClakitError


def check_shapes(checkpoint, plan, expected: dict, spec: str) -> None:
    """Every source tensor the plan reads has the shape the config gives the tensor it becomes.

    `expected`: output tensor name -> shape, from the model built on the meta device from the config. A config
    that disagrees with the weights (hidden_size edited) would otherwise convert into a checkpoint nothing loads;
    a consumer's k_proj shaped unlike its producer's would fail deep in the K/V merge. Reads headers only."""
    for name in plan.names:
        want = tuple(expected[name])
        for source_name in plan.sources[name]:
            tensor = checkpoint.get(source_name)
            if not tensor.dtype.is_floating_point:  # the group mean was cast back: an int64 or bool k_proj written
                raise ClakitError(
                    f"{spec}: tensor {source_name} is stored as {str(tensor.dtype).removeprefix('torch.')}, and a "
                    "Llama's weights are floating point (a quantized checkpoint says so in a quantization_config): "
                    "restore the checkpoint's own weights"
                )
            got = tuple(tensor.shape)
            if got != want:
                raise ClakitError(
                    f"{spec}: tensor {source_name} has shape {list(got)} but its config.json makes it {list(want)}; "
                    "the config does not describe these weights: restore the checkpoint's own config.json"
                )


def check_unused(plan, spec: str) -> None:
    """No decoder tensor of the checkpoint is left out: one would be when config.json has fewer layers than the
    weights (num_hidden_layers edited), and the conversion would silently drop them. (The tied lm_head and rotary
    buffers, which the model rebuilds, are the tensors legitimately left out.)"""
    layers = [n for n in plan.dropped if n.startswith("model.layers.") and not n.endswith("rotary_emb.inv_freq")]
    if layers:
        raise ClakitError(
            f"{spec} holds {len(layers)} decoder tensors its config.json has no place for (e.g. {layers[0]}); "
            "the config does not describe these weights: restore the checkpoint's own config.json"
        )


def check_tied(checkpoint, tied: dict[str, str], spec: str) -> None:
    """A tensor the config ties to another (lm_head to the embeddings) is not written, the model rebuilds it from
    its twin: a checkpoint that stores its own, different copy computes with that copy in transformers (which then
    unties them), so dropping it would silently change every logit."""
    for name, twin in tied.items():
        if name in checkpoint.names and twin in checkpoint.names:
            if not torch.equal(checkpoint.get(name), checkpoint.get(twin)):
                raise ClakitError(
                    f"{spec}: its config.json ties {name} to {twin} (tie_word_embeddings) but the checkpoint holds a "
                    f"different {name}, which transformers loads untied: set tie_word_embeddings to false in its "
                    "config.json"
                )
