"""Conversations as the model reads them: the tokenizer's chat template, the assistant turn's end.

Conversational rows (``data.format=conversational``) keep their messages (``[{role, content}, ...]``)
through the data stage; a stage renders them with its tokenizer: the prompt with the template's
generation prompt (the policy's turn comes next), an answer as exactly what the template puts after
that prompt, without the end-of-turn marker, which is the tokenizer's EOS (:func:`prepare_tokenizer`),
so that generation stops where the assistant's turn ends and the reward model and DPO score exactly the
assistant turn's tokens. Plain rows (the synthetic task, HH, column-mapped strings) are text: the
answer follows the prompt after one space.
"""

from __future__ import annotations

PROBE = "\x00probe\x00"  # an assistant turn's content that no template rewrites
ANSWER_FIELDS = ("response", "chosen", "rejected")


class ChatTemplateError(ValueError):
    """A chat template that does not render a conversation as prompt + answer; names the fix."""


def is_conversation(value) -> bool:
    return isinstance(value, list)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def end_of_turn(tokenizer) -> str:
    """What the template writes after an assistant turn's content (``<|im_end|>\\n`` for ChatML)."""
    full = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}], False)
    if PROBE not in full:
        raise ChatTemplateError(
            "the chat template does not write the assistant's content. Fix: set model.default_chat_template "
            "to a template that renders every message, or use a tokenizer with one."
        )
    return full.split(PROBE, 1)[1]


def prepare_tokenizer(tokenizer, default_template: str) -> None:
    """Give ``tokenizer`` a chat template (``default_template`` where it has none, its markers added as
    special tokens) and make the token that ends an assistant turn its EOS, so the policy stops there."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_template
        markers = [
            m for m in ("<|im_start|>", "<|im_end|>") if m in default_template and m not in tokenizer.get_vocab()
        ]
        if markers:
            tokenizer.add_special_tokens({"additional_special_tokens": markers})
    suffix = end_of_turn(tokenizer)
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    if eos is None or eos not in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        raise ChatTemplateError(
            f"the chat template ends an assistant turn with {suffix!r}, which does not start with a special token. "
            f"Fix: a template whose assistant turns end with one token (as ChatML's <|im_end|>)."
        )
    tokenizer.eos_token = eos


def render_prompt(tokenizer, prompt) -> str:
    return _render(tokenizer, prompt, True) if is_conversation(prompt) else prompt


def render_answer(tokenizer, prompt, answer) -> str:
    """The text that follows the rendered prompt: the assistant turn (without its end marker, the EOS),
    or, for plain text, the answer after one space."""
    if not is_conversation(answer):
        return answer if not answer or answer[:1].isspace() else " " + answer  # an empty answer is just the EOS
    head, full = _render(tokenizer, prompt, True), _render(tokenizer, prompt + answer, False)
    suffix = end_of_turn(tokenizer)
    if not full.startswith(head) or not full.endswith(suffix):
        raise ChatTemplateError(
            "the chat template does not render prompt + answer as the prompt with its generation prompt "
            "followed by the answer. Fix: set model.default_chat_template, or use a tokenizer whose template does."
        )
    return full[len(head) : len(full) - len(suffix)]


def render_row(tokenizer, row: dict) -> dict:
    """A split row with its prompt and answers as text the model reads (other fields unchanged)."""
    out = dict(row)
    if "prompt" in row:
        out["prompt"] = render_prompt(tokenizer, row["prompt"])
    for field in ANSWER_FIELDS:
        if field in row:
            out[field] = render_answer(tokenizer, row["prompt"], row[field])
    return out


def texts(row: dict) -> list[str]:
    """Every piece of text in a row (message contents for conversations), for training a tokenizer."""
    out = []
    for value in row.values():
        if isinstance(value, str):
            out.append(value)
        elif is_conversation(value):
            out += [m["content"] for m in value]
    return out
