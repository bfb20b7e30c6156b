"""The recipe's `chat_template`: a Jinja template, a built-in name, or 'auto' (the inputs' most common)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from fusemerge.errors import FusemergeError

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN = {"chatml": CHATML}


def model_chat_template(folder: Path) -> str | None:
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


def resolve_chat_template(value: str, model_folders: list[Path]) -> str:
    if "{{" in value or "{%" in value:
        return value
    if value in BUILTIN:
        return BUILTIN[value]
    if value == "auto":
        templates = [t for f in model_folders if (t := model_chat_template(f)) is not None]
        if not templates:
            raise FusemergeError(
                "chat_template: auto, but none of the models has a chat template", key="chat_template"
            )
        return Counter(templates).most_common(1)[0][0]
    raise FusemergeError(
        f"unknown chat_template '{value}' (a Jinja template, 'auto', or one of: {', '.join(BUILTIN)})",
        key="chat_template",
    )
