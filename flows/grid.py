"""Recipe grids for the sweep: expansion and validation, the ranking text, gates, the
Pareto front and which recipe each bit width promotes. Pure: no Prefect, DVC or MLflow.

A grid is data (params.yaml `sweep.grids.<name>`):

    base:    {key: value}            overrides every recipe of the grid gets
    axes:    {key: [v1, v2, ...]}     the cartesian product of these
    recipes: [{key: value}, ...]      and/or an explicit list (each merged over base)
    targets: [register]               DVC targets of each recipe's run (and their upstream)

Keys are params.yaml paths (`calibrate.steps`, `scheme.weight.format`), or `recipe`: a
recipe's text (`awq+tesseraq+e2e-qp:W3g64`, quant.recipe) or `{text: ..., options: {method:
{...}}}`, which sets the scheme and every stage's steps at once. A key that is not in
params.yaml is an error. Every recipe's effective params are validated as the
stages would validate them (`validate` callback) before any recipe runs, and two recipes
whose effective params are equal are an error: they would be the same experiment.

Ranking: the sweep ranks (and gates) on an evaluation text from another source than
the calibration/training text (`rank_text: auto`), since training on Wikipedia and
ranking on held-out Wikipedia rewards domain adaptation rather than quantization quality.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from quant.config import ConfigError

# prepare.calib_source / eval_sets names -> the corpus they come from
TEXT_SOURCE = {"embedded-wiki": "wikipedia", "wikitext2": "wikipedia", "lee": "news", "c4": "web"}
RECIPE_KEY = "recipe"  # a whole recipe (quant.recipe text) as one grid key


@dataclass(frozen=True)
class GridPoint:
    name: str  # readable and unique: the overrides that differ from params.yaml
    overrides: tuple[str, ...]  # key=value, values as YAML (DVC's -S syntax)
    targets: tuple[str, ...]
    effective: dict[str, Any] = field(compare=False, repr=False)

    @property
    def digest(self) -> str:
        blob = json.dumps(self.effective, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob + "|".join(self.targets).encode()).hexdigest()[:10]

    @property
    def exp_name(self) -> str:
        """A DVC experiment name: letters, digits and dashes."""
        return "sweep-" + self.digest

    def tags(self) -> dict[str, str]:
        return {"recipe": self.name, "recipe.digest": self.digest,
                **{f"recipe.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in self.overrides}}


# ---------------------------------------------------------------------------
# Expansion


def _set(params: dict[str, Any], key: str, value: Any, path: str) -> None:
    parts = key.split(".")
    node = params
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{path}: unknown knob {key!r} ({'.'.join(parts[: i + 1])!r} is not in params.yaml)")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"{path}: unknown knob {key!r}; it is not in params.yaml (method options are "
                          "part of a stage's steps: set e.g. calibrate.steps, or a recipe)")
    node[parts[-1]] = value


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def expand(grid: dict[str, Any], params: dict[str, Any], grid_name: str,
           validate: Callable[[dict[str, Any], str], None] | None = None) -> list[GridPoint]:
    """The grid's recipes, each checked; raises ConfigError before anything runs."""
    path = f"sweep.grids.{grid_name}"
    if not isinstance(grid, dict):
        raise ConfigError(f"{path} must be a mapping with axes/recipes, got {grid!r}")
    unknown = sorted(set(grid) - {"base", "axes", "recipes", "targets"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; accepted: ['axes', 'base', 'recipes', 'targets']")
    base = dict(grid.get("base") or {})
    axes = dict(grid.get("axes") or {})
    for k, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}.axes.{k} must be a non-empty list of values, got {values!r}")
    combos = [dict(zip(axes, vals, strict=True)) for vals in itertools.product(*axes.values())] if axes else []
    explicit = grid.get("recipes") or []
    if not isinstance(explicit, list) or not all(isinstance(r, dict) for r in explicit):
        raise ConfigError(f"{path}.recipes must be a list of mappings key -> value")
    raw = combos + [dict(r) for r in explicit]
    if not raw:
        raise ConfigError(f"{path} is empty: give `axes` (a cartesian product) and/or `recipes`")
    targets = tuple(grid.get("targets") or ("register",))
    recipes: list[GridPoint] = []
    seen: dict[str, str] = {}
    for i, rec in enumerate(raw):
        where = f"{path} recipe {i} ({rec})"
        effective = copy.deepcopy(params)
        effective.pop("sweep", None)
        overrides = {**base, **rec}
        overrides = _recipe_keys(overrides, where)
        for k, v in overrides.items():
            _set(effective, k, v, where)
        if validate is not None:
            validate(effective, where)
        # named by its own overrides that differ from params.yaml (the grid's base is common)
        differing = [(k, v) for k, v in rec.items() if k == RECIPE_KEY or _get(params, k) != v]
        name = ",".join(f"{k}={_value_text(v)}" for k, v in differing) or "defaults"
        r = GridPoint(name, tuple(f"{k}={_value_text(v)}" for k, v in overrides.items()), targets, effective)
        if r.digest in seen:
            raise ConfigError(f"{path}: recipes {seen[r.digest]!r} and {r.name!r} are the same after "
                              "defaults (equal effective params); drop one")
        seen[r.digest] = r.name
        recipes.append(r)
    return recipes


def _recipe_keys(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """The overrides with a `recipe` entry replaced by the params keys it sets."""
    if RECIPE_KEY not in overrides:
        return overrides
    from quant.recipe import Recipe

    value = overrides[RECIPE_KEY]
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"text", "options"})
        if unknown or "text" not in value:
            raise ConfigError(f"{where}: recipe must be a text or {{text, options}}; got keys {sorted(value)}")
        text, options = value["text"], value.get("options")
    else:
        text, options = value, None
    try:
        keys = Recipe.parse(text, options).params()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    # the scheme one level down (scheme.weight=..., scheme.activation=...): whole values, which a
    # DVC -S override merges into params.yaml exactly as they replace it here
    keys = {**{f"scheme.{k}": v for k, v in keys.pop("scheme").items()}, **keys}
    clash = sorted(k for k in overrides if k != RECIPE_KEY and any(
        k == r or k.startswith(r + ".") or r.startswith(k + ".") for r in keys))
    if clash:
        raise ConfigError(f"{where}: {clash} set what the recipe {text!r} sets; put it in the recipe")
    return {**{k: v for k, v in overrides.items() if k != RECIPE_KEY}, **keys}


def _get(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def weight_bits(effective: dict[str, Any]) -> int:
    """Bit width of the weights of a recipe (16 when they are not quantized)."""
    scheme = effective.get("scheme") or {}
    if "name" in scheme:
        m = re.match(r"^W(\d+)", str(scheme["name"]))
        return int(m.group(1)) if m else 16
    weight = scheme.get("weight")
    if not weight:
        return 16
    m = re.search(r"(\d+)", str(weight.get("format", "int4")))
    return int(m.group(1)) if m else 16


def rank_text(choice: str, prepare: dict[str, Any]) -> str:
    """The evaluation text that ranks: `auto` = the first one from another corpus than the
    calibration/training text."""
    evals = list(prepare.get("eval_sets") or [])
    if choice != "auto":
        if choice not in evals:
            raise ConfigError(f"sweep.rank_text={choice!r} is not one of prepare.eval_sets {evals}")
        return choice
    calib = TEXT_SOURCE.get(prepare.get("calib_source", ""), prepare.get("calib_source"))
    for text in evals:
        if TEXT_SOURCE.get(text, text) != calib:
            return text
    raise ConfigError(f"sweep.rank_text: auto found no evaluation text from another source than "
                      f"prepare.calib_source={prepare.get('calib_source')!r} among {evals}; add one "
                      "(e.g. lee or c4) or name the text")


# ---------------------------------------------------------------------------
# Rows: gates, Pareto front, promotion


def check_gates(row: dict[str, Any], max_ppl_ratio: float | None, max_acc_drop: float | None) -> list[str]:
    """The gates a finished recipe fails (empty: it passes). A missing number fails its gate."""
    failed = []
    if max_ppl_ratio is not None:
        ratio = row.get("ppl_ratio")
        if ratio is None or not math.isfinite(ratio) or ratio > max_ppl_ratio:
            failed.append(f"ppl_ratio {ratio if ratio is None else round(ratio, 4)} > {max_ppl_ratio}")
    if max_acc_drop is not None and row.get("acc_drop") is not None and row["acc_drop"] > max_acc_drop:
        failed.append(f"acc_drop {row['acc_drop']:.4f} > {max_acc_drop}")
    return failed


def pareto_front(rows: Iterable[dict[str, Any]], x: str = "bits_per_weight", y: str = "rank_ppl") -> set[str]:
    """Names of the rows no other row beats on both x and y (lower is better on both)."""
    pts = [(r["recipe"], r[x], r[y]) for r in rows
           if isinstance(r.get(x), int | float) and isinstance(r.get(y), int | float) and math.isfinite(r[y])]
    front = set()
    for name, a, b in pts:
        dominated = any((a2 <= a and b2 <= b) and (a2 < a or b2 < b) for _, a2, b2 in pts)
        if not dominated:
            front.add(name)
    return front


def choose_promotions(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per weight bit width, the recipe to promote: among finished recipes that pass every gate,
    the one with the lowest ranking PPL (it lies on that width's Pareto front; ties go to
    fewer bits per weight). Widths where no recipe passes get nothing."""
    best: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("status") != "finished" or r.get("failed_gates") or r.get("rank_ppl") is None:
            continue
        key = (r["rank_ppl"], r.get("bits_per_weight") or math.inf)
        cur = best.get(r["bits"])
        if cur is None or key < (cur["rank_ppl"], cur.get("bits_per_weight") or math.inf):
            best[r["bits"]] = r
    return best
