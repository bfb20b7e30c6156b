"""The one table of built-in chat templates, and the two ways a recipe's `chat_template` key resolves.

Merge and fuse both have a `chat_template` key but mean different things by it, so each has its own
resolver over the same table:

- `resolve_output_template` (merge): the template written into the merged model. An inline Jinja
  template, a built-in name, or `auto` (the most common template among the input model folders).
- `resolve_render_template` (fuse, eval): the template every conversation is rendered with, so that all
  models read the same text. `pivot` (the first/pivot model's own), a built-in name, or a `.jinja` file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from fusemerge.errors import FusemergeError

# For models whose tokenizer has no template (or to override it). The chatml text is byte-for-byte the one
# merges have always written into `chat_template.jinja`.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # openchat_3.5, FuseChat's pivot: "GPT4 Correct User: ...<|end_of_turn|>GPT4 Correct Assistant: ..."
    "openchat": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '<|end_of_turn|>' }}"
        "{% else %}{{ 'GPT4 Correct ' + ('User' if m['role'] == 'user' else 'Assistant') + ': ' + m['content']"
        " + '<|end_of_turn|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"
    ),
    # mergekit 0.1.5's built-in names (`chat_template: llama3` ...): written here in fusemerge's own words,
    # rendering the same text as the templates mergekit ships in mergekit/_data/chat_templates/ (odd
    # whitespace included: exaone's indentation, alpaca's missing blank line before a final "### Response:"),
    # so a recipe gives the same model either way (tests/merge/test_chat_template_names.py).
    "llama3": (
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
        "{% set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
        "'user_context': '### Input:\\n'} %}"
        "{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + (m['content'] | trim) }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}{% for m in turns %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system "
        "message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}"
        "{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system is defined else '') + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for m in messages %}"
        "{% if loop.first and m['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' + m['role'] + '|]' + m['content'] + '\\n' }}"
        "{{ '        \\n\\n' if m['role'] == 'user' else '        [|endofturn|]\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
    ),
}


def model_chat_template(folder: Path) -> str | None:
    """A model folder's own template: `chat_template.jinja`, else `tokenizer_config.json`'s string."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("chat_template")
        except ValueError:
            return None
        if isinstance(value, str):
            return value
    return None


def resolve_output_template(value: str, model_folders: list[Path]) -> str:
    """The merge recipe's `chat_template`: inline Jinja, a built-in name, or 'auto' over `model_folders`."""
    if "{{" in value or "{%" in value:
        return value
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if value == "auto":
        templates = [t for f in model_folders if (t := model_chat_template(f)) is not None]
        if not templates:
            raise FusemergeError(
                "chat_template: auto, but none of the models has a chat template", key="chat_template"
            )
        return Counter(templates).most_common(1)[0][0]
    raise FusemergeError(
        f"unknown chat_template '{value}' (a Jinja template, 'auto', or one of: {', '.join(BUILTIN_TEMPLATES)})",
        key="chat_template",
    )


def resolve_render_template(name: str, pivot_tokenizer: Any) -> str:
    """The Jinja template that renders every conversation: the pivot's own, a built-in name, or a file.

    It is compiled here, once: a template that is not valid Jinja is the template's fault, and would
    otherwise fail on every record in turn, each reported as a bad record of the data.
    """
    if name == "pivot":
        template = getattr(pivot_tokenizer, "chat_template", None)
        if not template:
            raise FusemergeError(
                f"the pivot's tokenizer has no chat template; set chat_template to one of "
                f"{sorted(BUILTIN_TEMPLATES)} or a .jinja file",
                key="chat_template",
            )
        template = (
            template if isinstance(template, str) else template.get("default", next(iter(template.values())))
        )
        problem = template_error(template)
        if problem:
            where = f"line {problem[0]}: " if problem[0] else ""
            raise FusemergeError(
                f"the pivot's tokenizer has a chat template that is not valid Jinja ({where}{problem[1]}); set "
                f"chat_template to one of {sorted(BUILTIN_TEMPLATES)} or a .jinja file",
                key="chat_template",
            )
        return template
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    path = Path(name)
    if path.suffix == ".jinja" and path.is_file():
        template = path.read_text(encoding="utf-8")
        problem = template_error(template)
        if problem:
            raise FusemergeError(f"not a valid Jinja chat template: {problem[1]}", file=path, line=problem[0])
        return template
    raise FusemergeError(
        f"unknown chat template '{name}': use 'pivot', one of {sorted(BUILTIN_TEMPLATES)}, or a .jinja file",
        key="chat_template",
    )


def template_error(template: str) -> tuple[int | None, str] | None:
    """(line, why) when `template` does not compile in transformers' chat-template environment, else None."""
    from jinja2 import TemplateError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: apply_chat_template reports the problem itself
        return None
    try:
        _compile_jinja_template(template)
    except TemplateError as exc:
        return getattr(exc, "lineno", None), str(getattr(exc, "message", None) or exc)
    return None
