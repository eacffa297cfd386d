"""A run config resolved once: its model config and precision recipes as objects.

`bitnet_jax.config` is plain data and imports nothing of the model (it loads in milliseconds);
the names in it (a preset, model overrides, recipe names) become objects here, once per run, and
the checks that need them run here too: unknown model fields, unknown recipes, a recipe whose
group size does not divide the model's widths, a sequence longer than the model's. Training,
sweeps and run directories take a `ResolvedRun` instead of calling `get_model_config` and
`get_recipe` again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from bitnet_jax.config import ModelSection, RunConfig, unknown_key_error, validate
from bitnet_jax.core.precision import PrecisionRecipe, get_recipe
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.model.transformer import ModelConfig, get_model_config, validate_recipe_for_model


@dataclass(frozen=True)
class ResolvedRun:
    """A checked run config with the objects its names stand for.

    `recipe` is the recipe of `config.precision`; `stage1_recipe` that of the first stage,
    `config.train.first_stage()` (None without one). Treat `config` as read-only:
    the model config and recipes were resolved from it.
    """

    config: RunConfig
    model: ModelConfig
    recipe: PrecisionRecipe
    stage1_recipe: Optional[PrecisionRecipe] = None

    @property
    def recipes(self) -> dict[str, PrecisionRecipe]:
        """Every recipe the run trains with, by the name the config gives it."""
        named = {}
        if self.stage1_recipe is not None:
            named[self.config.train.first_stage()[0]] = self.stage1_recipe
        named[self.config.precision] = self.recipe
        return named


def resolve_model(section: ModelSection) -> ModelConfig:
    """The ModelConfig of a config's `model:` section; an unknown field gets a suggestion."""
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in section.overrides:
        if key not in valid:
            raise unknown_key_error(str(key), valid, "model.overrides.")
    return get_model_config(section.preset, **{"scan_layers": section.scan_layers,
                                                "remat": section.remat, **section.overrides})


def resolve_recipe(name: str) -> PrecisionRecipe:
    """A recipe by the name a config gives it; an unknown name is a ConfigError."""
    try:
        return get_recipe(name)
    except ValueError as error:
        raise ConfigError(f"precision: {error}") from None


def resolve_run(config: RunConfig | ResolvedRun) -> ResolvedRun:
    """Check `config` in full and resolve its names; a ResolvedRun is returned as it is.

    Fails with one ConfigError naming the field before anything is computed.
    """
    if isinstance(config, ResolvedRun):
        return config
    validate(config)
    model = resolve_model(config.model)
    recipes = {}
    stage1 = config.train.first_stage()[0]
    for name in (config.precision, stage1):
        if name is not None and name not in recipes:
            recipes[name] = resolve_recipe(name)
            validate_recipe_for_model(model, recipes[name])
    require(config.data.seq_len <= model.max_seq_len,
            f"data.seq_len={config.data.seq_len} exceeds the model's max_seq_len="
            f"{model.max_seq_len}; lower data.seq_len or set model.max_seq_len")
    return ResolvedRun(config, model, recipes[config.precision],
                       recipes[stage1] if stage1 is not None else None)
