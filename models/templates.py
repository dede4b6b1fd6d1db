"""The prompt templates: the one owner of their text, their names and the default.

A template says how a conversation (earlier (query, response) turns and the new query) becomes the prompt
text, as data looked up by name (LLaVA's conversation.py style); `render` is the one function that applies
it. The image marker goes first when the conversation has an image (utils.language lays out the tokens).

The concept is called `template` in this project's code. Upstream names it three ways, and those spellings
stay only where upstream's callers meet them:

    --version NAME                           the flag of every script that takes a template (utils.cli)
    llama2_tokenizer(path, signal_type=...)  upstream's tokenizer loader; the loaded tokenizer and the text
    tokenizer.signal_type                    processor carry the name as `signal_type` (the processor's
    text_processor.signal_type               `template` under our name)
    template_version                         the key in SAT model_config.json and HF config.json (TEMPLATE_KEY),
                                             HF's build_conversation_input_ids(template_version=) and the HF
                                             processor; scripts/convert_checkpoint.py also takes
                                             --template_version for its --version

models/hf_cogvlm/configuration_cogvlm.py holds a copy of the template text, because a converted checkpoint
carries that file without this project (trust_remote_code); tests/test_one_source.py checks that the copy
equals TEMPLATES.

This module imports only the standard library and models.errors: the flag parsers read it before any model
code loads.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from models.errors import PromptError

IMAGE_MARKER = "<EOI>"  # where the image block goes in a prompt string; never tokenised
TEMPLATE_KEY = "template_version"  # how checkpoint metadata (model_config.json, config.json) spells it


@dataclass(frozen=True)
class PromptTemplate:
    """How a query and earlier turns become a prompt; `answer_separator` ends the prompt."""
    query: str                      # format with {query}
    turn: Optional[str] = None      # format with {query} {response}; None = history is not shown
    answer_separator: Optional[str] = None


TEMPLATES: Dict[str, PromptTemplate] = {
    "base": PromptTemplate("{query}"),
    "chat": PromptTemplate("Question: {query} Answer:", "Question: {query} Answer: {response}\n", "Answer:"),
    "vqa": PromptTemplate("Question: {query} Short answer:", "Question: {query} Short answer: {response}\n",
                          "Short answer:"),
}
TEMPLATE_NAMES: Tuple[str, ...] = tuple(TEMPLATES)
DEFAULT_TEMPLATE = "chat"  # when neither the flags nor the checkpoint name one


def get_template(name: str) -> PromptTemplate:
    """The template called `name` (PromptError naming the choices for an unknown one)."""
    if name not in TEMPLATES:
        raise PromptError(f"unknown --version '{name}'; choose one of {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def render(template: str, query: str, history: Sequence[Tuple[str, str]] = (), with_image: bool = True) -> str:
    """The prompt text of `query` after the earlier turns `history` [(query, response), ...] in `template`,
    with the image marker first when `with_image`."""
    parts = get_template(template)
    prompt = IMAGE_MARKER if with_image else ""
    if parts.turn is not None:
        for old_query, response in history or ():
            prompt += parts.turn.format(query=old_query, response=response)
    return prompt + parts.query.format(query=query)
