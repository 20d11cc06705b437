"""Checkpoint conversion to CLA: `convert` (streamed, the `clakit convert` command) and its building blocks.

`layout` (sharing layouts), `inmemory` (CLA model from an in-memory model), `checkpoint` (lazy reader, sharded
writer), `streaming` (which tensors are written and how), `output_folder` (config, tokenizer, card, record),
`pipeline` (the command itself); `config` (ConvertConfig, every setting); `layerwise` (a model read one decoder
layer at a time); `calibrate` fits K/V on data.
"""

from clakit.convert.config import INITS, ConvertConfig
from clakit.convert.pipeline import DATA_AWARE_INITS, DEFAULT_DATA_INIT, ConvertSettings, convert

__all__ = ["DATA_AWARE_INITS", "DEFAULT_DATA_INIT", "INITS", "ConvertConfig", "ConvertSettings", "convert"]
