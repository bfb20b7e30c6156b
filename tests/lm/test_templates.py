"""One table of chat templates behind both recipe keys: merge's `chat_template` and fuse's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fusemerge.errors import FusemergeError
from fusemerge.lm.templates import (
    BUILTIN_TEMPLATES,
    model_chat_template,
    resolve_output_template,
    resolve_render_template,
)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_a_builtin_name_means_the_same_text_to_merge_and_to_fuse(name) -> None:
    no_template = SimpleNamespace(chat_template=None)
    assert resolve_output_template(name, []) == resolve_render_template(name, no_template)
    assert resolve_output_template(name, []) == BUILTIN_TEMPLATES[name]


def test_merge_auto_takes_the_most_common_template_of_the_inputs(tmp_path) -> None:
    folders = []
    for i, template in enumerate(["A {{ x }}", "B {{ x }}", "B {{ x }}"]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        if i == 0:
            (folder / "chat_template.jinja").write_text(template)
        else:
            (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        folders.append(folder)
    assert model_chat_template(folders[0]) == "A {{ x }}"
    assert resolve_output_template("auto", folders) == "B {{ x }}"
    assert resolve_output_template("{{ inline }}", folders) == "{{ inline }}"


def test_fuse_takes_the_pivots_template_or_a_jinja_file(tmp_path) -> None:
    assert resolve_render_template("pivot", SimpleNamespace(chat_template="P {{ m }}")) == "P {{ m }}"
    path = tmp_path / "mine.jinja"
    path.write_text("F {{ m }}")
    assert resolve_render_template(str(path), SimpleNamespace(chat_template=None)) == "F {{ m }}"


def test_unknown_names_are_one_line_errors_naming_the_key(tmp_path) -> None:
    with pytest.raises(FusemergeError, match="unknown chat_template 'nope'") as merge_error:
        resolve_output_template("nope", [])
    with pytest.raises(FusemergeError, match="unknown chat template 'nope'") as fuse_error:
        resolve_render_template("nope", SimpleNamespace(chat_template=None))
    with pytest.raises(FusemergeError, match="has no chat template"):
        resolve_render_template("pivot", SimpleNamespace(chat_template=None))
    with pytest.raises(FusemergeError, match="none of the models has a chat template"):
        resolve_output_template("auto", [tmp_path])
    for error in (merge_error.value, fuse_error.value):
        assert error.key == "chat_template" and "\n" not in str(error)


def test_an_invalid_jinja_file_fails_once_naming_file_and_line(tmp_path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")
    with pytest.raises(FusemergeError) as info:
        resolve_render_template(str(template), SimpleNamespace(chat_template=None))
    assert (info.value.file, info.value.line) == (str(template), 2)
    assert "not a valid Jinja chat template" in info.value.message


def test_an_invalid_template_of_the_pivot_is_the_templates_fault() -> None:
    with pytest.raises(FusemergeError, match="not valid Jinja") as info:
        resolve_render_template("pivot", SimpleNamespace(chat_template="{% if %}"))
    assert info.value.key == "chat_template"
