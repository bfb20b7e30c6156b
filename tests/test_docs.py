"""The documentation against the code: docs/recipes.md's recipe tables (every key, allowed value and default
of the pydantic recipe models), its complete example recipes (they load), and the README's methods table
(every registered merge method with its base policy, model count, parameters and defaults).

A table is tied to its model by the HTML comment above it: `<!-- reference: fusemerge.fuse.recipe.TeacherSpec -->`.
"""

from __future__ import annotations

import importlib
import re
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from fusemerge.fuse.recipe import FuseRecipe
from fusemerge.merge.methods import all_methods
from fusemerge.merge.parameters import MISSING
from fusemerge.merge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES_MD = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARKER = re.compile(r"^<!-- reference: ([\w.]+) -->$", re.M)
REFERENCED = MARKER.findall(RECIPES_MD)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split(" | ")]


def _table_after(text: str, start: int) -> dict[str, list[str]]:
    """key -> cells of the Markdown table that starts after `start` (header and separator skipped)."""
    rows: dict[str, list[str]] = {}
    lines = text[start:].splitlines()[1:]
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        key = re.fullmatch(r"`([\w.\[\]]+)`", cells[0])
        assert key, f"first cell is not a `key`: {line}"
        rows[key.group(1).rsplit(".", 1)[-1]] = cells
    return rows


def _literal_values(annotation: object) -> list[object]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [v for arg in typing.get_args(annotation) for v in _literal_values(arg)]
    return []


def _same(cell: str, default: object) -> bool:
    match = re.fullmatch(r"`([^`]+)`", cell)
    if not match:
        return False
    value = yaml.safe_load(match.group(1))
    if isinstance(default, float) and not isinstance(default, bool):
        return isinstance(value, int | float | str) and float(value) == default
    return value == default


def test_every_recipe_model_has_a_reference_table():
    assert set(REFERENCED) == {
        "fusemerge.fuse.recipe.FuseRecipe",
        "fusemerge.fuse.recipe.ModelSpec",
        "fusemerge.fuse.recipe.DatasetSpec",
        "fusemerge.fuse.recipe.TeacherSpec",
        "fusemerge.fuse.recipe.AlignmentSpec",
        "fusemerge.fuse.recipe.FusionSpec",
        "fusemerge.fuse.recipe.TrainingSpec",
        *(
            f"fusemerge.fuse.implicit.spec.{name}"
            for name in (
                "ImplicitSpec",
                "SamplingSpec",
                "ScoringSpec",
                "RewardModelSpec",
                "CodeTestsSpec",
                "PairsSpec",
                "PreferenceSpec",
                "DataFileSpec",
            )
        ),
        "fusemerge.merge.recipe.MergeRecipe",
        "fusemerge.merge.recipe.InputModel",
    }


@pytest.mark.parametrize("dotted", REFERENCED)
def test_reference_table_matches_the_model(dotted):
    module, name = dotted.rsplit(".", 1)
    model: type[BaseModel] = getattr(importlib.import_module(module), name)
    rows = _table_after(RECIPES_MD, RECIPES_MD.index(f"<!-- reference: {dotted} -->"))
    fields = {(info.alias or field): info for field, info in model.model_fields.items() if not info.exclude}
    assert set(rows) == set(fields), f"{name}: documented {sorted(rows)} but the model has {sorted(fields)}"
    for key, info in fields.items():
        _, allowed, default, meaning = rows[key]
        assert meaning, f"{name}.{key}: no meaning given"
        for value in _literal_values(info.annotation):
            assert f"`{value}`" in allowed, f"{name}.{key}: allowed value {value!r} is not documented"
        if info.is_required():
            assert default == "*required*", f"{name}.{key}: required, documented {default!r}"
        elif info.default is None:
            assert default == "unset", f"{name}.{key}: default None, documented {default!r}"
        elif isinstance(info.default, BaseModel):
            assert default == "see below", f"{name}.{key}: a section, documented {default!r}"
        else:
            assert _same(default, info.default), (
                f"{name}.{key}: default {info.default!r}, documented {default}"
            )


def _yaml_block_after(heading: str) -> str:
    rest = RECIPES_MD[RECIPES_MD.index(heading) :]
    return rest.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_complete_example_recipes_load():
    fuse = FuseRecipe.model_validate(yaml.safe_load(_yaml_block_after("### A complete fuse recipe")))
    assert fuse.sources[0].load_in_4bit and fuse.training.gradient_accumulation == 32
    implicit = FuseRecipe.model_validate(yaml.safe_load(_yaml_block_after("### A complete implicit recipe")))
    assert implicit.fusion.kind == "implicit" and implicit.implicit.preference.loss == "ln_dpo"
    merge = parse_recipe(_yaml_block_after("### A complete merge recipe"))
    assert merge.merge_method == "variation_ratio" and merge.parameters == {"granularity": "matrix"}


def _fmt(value: object) -> str:
    if value is MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else re.sub(r"e-0*(\d)", r"e-\1", f"{value:g}")
    return str(value)


def test_the_readme_methods_table_lists_every_registered_method():
    section = README[README.index("### Methods") :]
    table = section[section.index("\n| method |") :].splitlines()[3:]
    rows = {}
    for line in table:
        if not line.startswith("| `"):
            break
        cells = _cells(line)
        rows[re.match(r"`(\w+)`", cells[0]).group(1)] = cells
    methods = all_methods()
    assert set(rows) == {m.name for m in methods}
    for method in methods:
        name_cell, base, models, per_model, shared, reference = rows[method.name]
        for alias in method.aliases:
            assert f"`{alias}`" in name_cell
        assert base == {"required": "required", "optional": "optional", "ignored": "—"}[method.base]
        count = str(method.min_models) if method.min_models == method.max_models else f"≥ {method.min_models}"
        assert models == count, f"{method.name}: {models} models, the registry says {count}"
        for cell, params in ((per_model, method.per_model), (shared, method.shared)):
            documented = re.findall(r"`(\w+)` \(", cell)
            assert sorted(documented) == sorted(params), f"{method.name}: {documented} vs {sorted(params)}"
            for pname, param in params.items():
                pattern = rf"`{pname}` \({re.escape(_fmt(param.default))}[),;:]"
                assert re.search(pattern, cell), f"{method.name}.{pname}: default {_fmt(param.default)}"
        assert reference != "—" and "](" in reference
