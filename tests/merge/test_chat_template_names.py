"""mergekit's built-in chat templates by name (`chat_template: llama3`, ...), rendering the same text.

The names and reference texts are the templates the installed mergekit wheel ships in
`mergekit/_data/chat_templates/`; each is rendered as transformers renders chat templates (a sandboxed
Jinja environment with trim_blocks and lstrip_blocks) over conversations with and without a system turn,
trailing whitespace, an `user_context` turn (alpaca's), role errors (mistral's) and a generation prompt.
"""

from __future__ import annotations

import itertools
from importlib.resources import files

import pytest
from click.testing import CliRunner

from fusemerge.cli import main
from tests.merge.conformance import bpe_tokenizer, picollama

pytest.importorskip("mergekit")

SHIPPED = sorted(
    p.name.removesuffix(".jinja")
    for p in files("mergekit._data.chat_templates").iterdir()
    if p.name.endswith(".jinja")
)
S = {"role": "system", "content": " Be brief. "}
U = {"role": "user", "content": "Hello?\n"}
A = {"role": "assistant", "content": " Hi."}
U2 = {"role": "user", "content": "Bye."}
C = {"role": "user_context", "content": "ctx "}
CONVERSATIONS = [
    [U],
    [S, U],
    [U, A],
    [U, A, U2],
    [S, U, A, U2],
    [S, U, A],
    [C, U],
    [U, C, A],
    [A],
    [S, S, U],
    [U, U],
]


def render(template: str, messages: list[dict], generation: bool) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=generation, bos_token="<s>", eos_token="</s>"
        )
    except TemplateError as exc:
        return f"error: {exc}"


def mergekit_template(name: str) -> str:
    return files("mergekit._data.chat_templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def test_mergekit_ships_the_templates_we_know():
    assert {"alpaca", "chatml", "exaone", "llama3", "mistral"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_merge_writes_the_named_template(name, tmp_path):
    base = picollama(tmp_path / "base", 1)
    bpe_tokenizer(64, []).save_pretrained(base)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\nchat_template: {name}\n"
    )
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8")
    reference = mergekit_template(name)
    for messages, generation in itertools.product(CONVERSATIONS, (False, True)):
        assert render(written, messages, generation) == render(reference, messages, generation), (
            [m["role"] for m in messages],
            generation,
        )


def test_names_in_the_one_table():
    from fusemerge.lm.templates import BUILTIN_TEMPLATES

    assert set(SHIPPED) <= set(BUILTIN_TEMPLATES)


def test_an_unknown_name_stays_an_error_listing_the_known_ones(tmp_path):
    base = picollama(tmp_path / "base", 1)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\nchat_template: vicuna\n"
    )
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    assert "llama3" in result.output
