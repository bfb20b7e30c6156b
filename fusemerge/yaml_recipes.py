"""Loading YAML recipes into pydantic models with errors that point at file, line and key.

Both recipes (merge and fuse) share this: a typo must come back as `recipe.yml:7, key 'out_dtyp': unknown
key`, never as a pydantic dump or a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fusemerge.errors import FusemergeError

M = TypeVar("M", bound=BaseModel)


def read_recipe_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FusemergeError("recipe file not found", file=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FusemergeError(f"cannot read the recipe ({exc})", file=path) from exc


def parse_mapping(text: str, path: Path | str, *, what: str) -> tuple[dict[str, Any], yaml.Node | None]:
    """The YAML document as a dict plus its node tree (for line numbers). `what` describes the expected keys."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise FusemergeError(f"invalid YAML: {problem}", file=path, line=line) from exc
    if not isinstance(data, dict):
        raise FusemergeError(f"a recipe must be a YAML mapping ({what})", file=path, line=1)
    return data, node


def validate(model: type[M], data: dict[str, Any], path: Path | str, node: yaml.Node | None) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, path, node) from exc


def validation_error(exc: ValidationError, path: Path | str, node: yaml.Node | None) -> FusemergeError:
    # Union members each report an error; an unknown or missing key is the most helpful of them.
    errors = exc.errors()
    err = next((e for e in errors if e["type"] in ("extra_forbidden", "missing")), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
    key = ".".join(str(p) for p in loc) or None
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key (check its spelling; unknown keys are never ignored)"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif "input" in err and err["type"] not in ("model_type", "dict_type"):
        message = f"{message} (got {err['input']!r})"
    return FusemergeError(message, file=path, line=line_of(node, loc), key=key)


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node on the path `loc` (a pydantic error location)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


_KEY_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def key_path(key: str) -> tuple[str | int, ...]:
    """`models[0].parameters.weight` as the path ('models', 0, 'parameters', 'weight')."""
    return tuple(int(index) if index else name for index, name in _KEY_PART.findall(key))


def with_recipe_line(exc: FusemergeError, path: Path, text: str) -> FusemergeError:
    """`exc` naming `path` and the line of its key, when it names a recipe key but no line.

    Errors about the recipe are raised where the problem is found, often far from the YAML; this puts the
    file:line on all of them in one place. CLI options (`--engine`) and other files are left as they are.
    """
    if exc.line is not None or not exc.key or exc.key.startswith("--"):
        return exc
    if exc.file is not None and Path(exc.file) != path:
        return exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return exc
    line = line_of(node, key_path(exc.key))
    return FusemergeError(exc.message, file=path, line=line, key=exc.key, tensor=exc.tensor)
