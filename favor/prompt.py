"""Prompt assembly exactly as the release: text chunks around one audio-visual chunk.

    [BOS] "USER: <Img>" [AV embeddings] "</Img> {prompt}\\nASSISTANT:" -> answer

BOS enters as an embedding (not through the tokenizer); ``<Img>``/``</Img>`` are plain text; there is
no system prompt (FAVOR-SPEC.md section 5.2). Training targets are each assistant turn followed by EOS;
everything else is labelled IGNORE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROMPT_START = "USER: <Img>"
AV_END = "</Img> "
ASSISTANT = "\nASSISTANT:"
IGNORE = -100


@dataclass
class PromptIds:
    """Token ids around the AV chunk; ``labels`` aligns with ``post`` (IGNORE where not trained)."""

    pre: list[int]
    post: list[int]
    labels: list[int]


# The question every streamed window is asked (favor-rt's default; the synthetic world's stream_caption
# samples ask it too, so a model is trained on the text it is served).
CAPTION_PROMPT = "Describe what happens in the video and the audio."


def chat_prompt(question: str, history: list[tuple[str, str]] | None = None) -> str:
    """The release's multi-turn prompt string (inference.py ``predict``)."""
    if not history:
        return question
    text = ""
    for i, (q, a) in enumerate(history):
        text += f"{q}\nASSISTANT: {a}\n" if i == 0 else f" USER: {q}\nASSISTANT: {a}\n"
    return text + f" USER: {question}"


def stream_prompt(question: str, previous: Sequence[str]) -> str:
    """A streamed window's LLM prompt: the same question with the captions of the windows before it as
    earlier turns (runtime.stream's bounded context)."""
    return chat_prompt(question, [(question, c) for c in previous])


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def inference_ids(tokenizer, prompt: str) -> PromptIds:
    post = _ids(tokenizer, AV_END + prompt + ASSISTANT)
    return PromptIds(_ids(tokenizer, PROMPT_START), post, [IGNORE] * len(post))


def conversation_ids(tokenizer, conversation: list[dict], eos_id: int, max_tokens: int) -> PromptIds:
    """Training ids for a conversation [{"from": "human"|"gpt", "value": str}, ...].

    First human turn: ``"</Img> " + q + "\\nASSISTANT:"``; later ones ``"USER: " + q + "\\nASSISTANT:"``;
    each gpt turn ``value`` + EOS, trained. Truncated to ``max_tokens`` after the AV chunk.
    """
    if not conversation or conversation[0].get("from") != "human":
        raise ValueError("a conversation must start with a human turn")
    post: list[int] = []
    labels: list[int] = []
    for i, turn in enumerate(conversation):
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {i} has no text value")
        if role == "human":
            ids = _ids(tokenizer, (AV_END if i == 0 else "USER: ") + value + ASSISTANT)
            post += ids
            labels += [IGNORE] * len(ids)
        elif role == "gpt":
            ids = _ids(tokenizer, value) + [eos_id]
            post += ids
            labels += ids
        else:
            raise ValueError(f"turn {i} role must be 'human' or 'gpt', got {role!r}")
    return PromptIds(_ids(tokenizer, PROMPT_START), post[:max_tokens], labels[:max_tokens])


def clean_answer(text: str) -> str:
    """The release's post-processing: cut at the first '\\n#' (its '##' stop convention)."""
    return text.split("\n#")[0].strip()
