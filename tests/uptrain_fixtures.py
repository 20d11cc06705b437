"""Fixtures for the uptrain tests: a tiny CLA2 checkpoint and tiny recipes written to temp folders."""

from pathlib import Path

import pytest
import yaml
from conftest import save_checkpoint, tiny_model

from clakit.convert.inmemory import cla_model_from
from clakit.convert.layout import uniform_layout


@pytest.fixture(scope="session")
def tiny_cla_checkpoint(tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama of conftest converted to CLA2 (mean init), saved like the converter does."""
    path = tmp_path_factory.mktemp("tiny_cla2")
    return save_checkpoint(cla_model_from(tiny_model("llama"), uniform_layout(4, 2), "mean"), tokenizer, path)


def tiny_recipe(corpus_dir: Path, output_dir: Path, **sections) -> dict:
    """A recipe small enough to train in seconds on CPU; `sections` are merged over the defaults."""
    recipe = {
        "data": {
            "train": [str(corpus_dir / "train.txt")],
            "eval": [str(corpus_dir / "heldout.txt")],
            "seq_len": 32,
            "eval_max_tokens": 128,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 6,
            "learning_rate": "3e-3",
            "per_device_train_batch_size": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "warmup_steps": 1,
        },
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "o_proj", "gate_proj"]},
        "distill": {"weight": 0.0},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def killed_at_step(step: int, recipe: Path) -> None:
    """Run `recipe` and kill it after optimizer step `step`: a KeyboardInterrupt from inside the trainer, which is
    what a kill looks like from inside (no cleanup, no final save). The trainer is restored afterwards."""
    from clakit.uptrain import trainer as trainer_module
    from clakit.uptrain import uptrain

    hook = trainer_module.Trainer.on_step_end

    def kill(self):
        hook(self)
        if self.step == step:
            raise KeyboardInterrupt

    trainer_module.Trainer.on_step_end = kill
    try:
        with pytest.raises(KeyboardInterrupt):
            uptrain(recipe, quiet=True)
    finally:
        trainer_module.Trainer.on_step_end = hook
