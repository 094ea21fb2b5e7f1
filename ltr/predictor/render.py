"""The predictor's input for a request: one function for training, evaluation and the ingress.

A chat request is scored on the conversation as the served model will see it: the model's chat
template over the history and the last user turn. The encoder reads few tokens (`max_length`), so the
rendered text is cut *from the left*: the oldest history goes first and the last user message stays
whole (when it alone is longer than the encoder's window, its beginning is kept, as for a completion
prompt). A completion request is scored on its prompt. An artifact trained on prompts only
(`PredictorConfig.chat_template` empty, the shipped one) scores a chat by its last user message, which is
what it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_TEXT_LIMIT_FACTOR = 12   # characters of rendered history kept per encoder token before tokenizing


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, Mapping) and part.get("type") == "text")
    return ""


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and message_text(message).strip():
            return message_text(message)
    raise ValueError("messages must contain a non-empty user message")


def conversation_text(item: str | Sequence[Mapping[str, Any]]) -> str:
    """What a request's conversation is known by, whatever the predictor made of it: a completion's prompt, a
    chat's first user message ("" without one), the same for every turn. The served-traffic log splits by its
    hash, so every turn of a conversation, scored or not, lands in one slice."""
    if isinstance(item, str):
        return item
    return next((message_text(m) for m in item if m.get("role") == "user" and message_text(m).strip()), "")


def render_chat(messages: Sequence[Mapping[str, Any]], chat_template: str, tokenizer: Any) -> str:
    """The served model's chat template over `messages`, with the assistant's generation prompt.

    `tokenizer` only runs the template (any Hugging Face tokenizer does); the template itself is the
    served model's, stored in the predictor artifact so that scoring never needs the served model.
    """
    plain = [{"role": "system" if m.get("role") == "developer" else m.get("role"), "content": message_text(m)}
             for m in messages]
    return tokenizer.apply_chat_template(plain, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True)


def fit_left(text: str, keep_from: int, tokenizer: Any, max_length: int) -> str:
    """The longest suffix of `text` that fits `max_length` encoder tokens and starts at or before
    `keep_from` (the last user message), or, when `text[keep_from:]` alone does not fit, its beginning."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    start = max(0, keep_from - budget * _TEXT_LIMIT_FACTOR)
    window = text[start:]
    # verbose=False: measuring a window longer than the encoder is the point here, not an indexing error
    offsets = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"]
    if len(offsets) <= budget:
        return window
    keep_at = keep_from - start
    first_kept = next((i for i, (_, end) in enumerate(offsets) if end > keep_at), len(offsets))
    if len(offsets) - first_kept > budget:   # the last turn alone is too long: keep its beginning
        return window[offsets[first_kept][0]: offsets[first_kept + budget - 1][1]]
    return window[offsets[len(offsets) - budget][0]:]


def chat_input(messages: Sequence[Mapping[str, Any]], chat_template: str | None, tokenizer: Any,
               max_length: int) -> str:
    """What the predictor scores for a chat request (see the module docstring)."""
    last = last_user_text(messages)
    if not chat_template:
        return last
    rendered = render_chat(messages, chat_template, tokenizer)
    keep_from = rendered.rfind(last)
    if keep_from < 0:   # a template that rewrites the message: keep what fits from the end
        keep_from = len(rendered)
    return fit_left(rendered, keep_from, tokenizer, max_length)
