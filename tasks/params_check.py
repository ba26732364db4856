"""One check of a whole params.yaml, as every entry path runs it (every stage before it starts,
the flow's override check, the sweep's grid check): each stage section's typed config and the
recipe as a whole. `python -m tasks.params_check` checks ./params.yaml (exit 2 and one `error:`
line when it fails): run it before a hand-run `dvc repro` or `dvc exp run` of edited params.

Kept apart from tasks/common.py on purpose: it imports every stage's config, and a stage's
DVC deps are the code that can change its output (tests/test_stage_deps.py), which another
stage's params validation cannot.
"""

from __future__ import annotations

import importlib

from quant.config import Config
from tasks.common import Params

# The typed config of each stage's params section (base/model/scheme are typed by
# load_params itself): the one table every entry path checks params with (`check_params`).
SECTION_CONFIGS = {
    "prepare": "tasks.prepare:PrepareConfig",
    "synthesize": "quant.synth.sampling:SynthesisConfig",
    "merge": "quant.synth.merge:MergeConfig",
    "calibrate": "tasks.calibrate:CalibrateConfig",
    "block_ap": "tasks.block_ap:BlockAPStageConfig",
    "e2e": "tasks.e2e:E2EStageConfig",
    "convert": "tasks.convert:ConvertConfig",
    "evaluate": "tasks.evaluate:EvaluateConfig",
    "register": "tasks.register:RegisterConfig",
}


def section_config(name: str) -> type[Config]:
    module, cls = SECTION_CONFIGS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_params(params: Params, sections: set[str] | None = None) -> None:
    """Build the typed config of every stage section (or of `sections`), and check the recipe
    as a whole: the scheme against every stage's steps (quant.recipe). Raises ConfigError."""
    from quant.recipe import Recipe

    recipe = {"calibrate", "block_ap", "e2e"}
    names = set(SECTION_CONFIGS) if sections is None else sections & set(SECTION_CONFIGS)
    if sections is not None and sections & (recipe | {"scheme"}):
        names |= recipe  # a recipe is checked whole: the scheme against every stage's steps
    built = {name: params.section(name, section_config(name)) for name in sorted(names)}
    if recipe <= set(built):
        Recipe(params.scheme, built["calibrate"].steps, built["block_ap"].steps, built["e2e"].steps)


if __name__ == "__main__":
    import sys

    from quant.config import ConfigError
    from tasks.common import load_params

    try:
        check_params(load_params())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("params.yaml: ok")
