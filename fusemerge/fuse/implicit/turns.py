"""Where an assistant turn ends, in one model's chat template: what `sample` cuts off and training adds back.

A chat template writes some text after each assistant message's content: ChatML `<|im_end|>\\n`, Llama 3
`<|eot_id|>`, the demo's plain template a blank line (`\\n\\n`). A model generates that text itself and
then stops on a stop token. Two faults follow when the pipeline ignores it:

- In `sample`, a template whose turn end is plain text (no special token) leaves that text in the decoded
  response ("28\\n\\n"); rendered again for training, the template writes it a second time
  ("28\\n\\n\\n\\n"), a sequence the model never produced. So a response that stopped has the template's
  plain-text turn end removed (`strip_turn_end`): the stored response is the message content the template
  would render back into exactly what the model generated.
- In `sft` and `preference`, such a template writes no stop token at all, so training on its renderings
  teaches the model never to stop (after one epoch of SFT the demo's pivot ran on past its answers, and
  the last number it wrote, which `math_answer` scores, was no longer its answer). So the tokenizer's
  end-of-sequence token is appended after each assistant turn's end (`close_spans`, `needs_eos`), with
  loss, as the model saw it in pre-training and as TRL appends it to plain-text completions.

Templates whose turn end holds a special token (every real chat model's) are left exactly as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBE = "fusemerge-turn-probe"  # an assistant content no template changes


@dataclass(frozen=True)
class TurnEnd:
    """What a template writes after an assistant message's content, and the stop token training adds."""

    suffix: str = ""  # the template's text after the content ("" when it could not be probed)
    text_before_stop: str = ""  # the plain text the model generates before stopping ("\n\n"; "" for ChatML)
    eos: str | None = None  # the end-of-sequence token to append after the turn (None: the template has one)

    @property
    def needs_eos(self) -> bool:
        return self.eos is not None


def special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens as text, longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return sorted((s for s in found if s), key=len, reverse=True)


def turn_end(tokenizer: Any, template: str) -> TurnEnd:
    """Probe `template` with a one-exchange conversation: the text after the assistant content.

    Args:
        tokenizer: the model's tokenizer (its special tokens and end-of-sequence token).
        template: the Jinja chat template the model chats in.
    """
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # a template with rules of its own (a required system turn): leave its turns alone
        return TurnEnd()
    if not isinstance(text, str) or PROBE not in text:
        return TurnEnd()
    suffix = text[text.rindex(PROBE) + len(PROBE) :]
    specials = special_strings(tokenizer)
    first = min((i for i in (suffix.find(s) for s in specials) if i >= 0), default=-1)
    if first >= 0:
        return TurnEnd(suffix=suffix, text_before_stop=suffix[:first])
    eos = getattr(tokenizer, "eos_token", None)
    return TurnEnd(suffix=suffix, text_before_stop=suffix, eos=str(eos) if eos else None)


def strip_turn_end(response: str, end: TurnEnd) -> str:
    """A stopped response as message content: without the template's plain-text turn end, if it has it.

    Args:
        response: the decoded text of a response that ended on a stop token.
        end: the answering model's `turn_end`.
    """
    lead = end.text_before_stop
    if lead and response.endswith(lead):
        return response[: -len(lead)]
    return response


def close_spans(
    text: str, spans: tuple[tuple[int, int], ...], end: TurnEnd
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The rendered conversation with the stop token after each assistant turn, the turn end in its span.

    Unchanged when the template writes its own stop token. Otherwise each assistant span is extended over
    the template's turn end (when the text there is that turn end) and the end-of-sequence token is
    inserted after it, inside the span: the model learns to stop where its turn ends.

    Args:
        text: the conversation rendered by the template.
        spans: (start, end) characters of each assistant turn (`render_conversation`).
        end: the template's `turn_end`.
    """
    if not end.needs_eos or not spans:
        return text, spans
    eos = str(end.eos)
    out: list[str] = []
    closed: list[tuple[int, int]] = []
    cursor = shift = 0
    for start, stop in spans:
        if end.suffix and text.startswith(end.suffix, stop):
            stop += len(end.suffix)
        out.append(text[cursor:stop])
        out.append(eos)
        closed.append((start + shift, stop + shift + len(eos)))
        shift += len(eos)
        cursor = stop
    out.append(text[cursor:])
    return "".join(out), tuple(closed)
