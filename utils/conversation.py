"""A conversation: the prompt template, the image (CogVLM sees one, placed before all turns) and the turns so far.

The CLI, the web demo and the API server all keep their chats as a `Conversation`; `utils.processor` turns
one (plus the next question) into model inputs.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from PIL import Image

from models.templates import DEFAULT_TEMPLATE, IMAGE_MARKER, get_template, render

History = List[Tuple[str, str]]


@dataclass
class Conversation:
    """template: a `--version` name (models.templates.TEMPLATES). image: RGB, or None for text only.
    history: earlier (question, answer) turns. no_prompt (`--no_prompt`, as upstream): with an image, the
    prompt is the image alone (no template, history or question)."""
    template: str = DEFAULT_TEMPLATE
    image: Optional[Image.Image] = None
    history: History = field(default_factory=list)
    no_prompt: bool = False

    def __post_init__(self):
        get_template(self.template)  # an unknown name fails here, before any work

    def prompt(self, query: str) -> str:
        """The prompt text for the next question (the image marker first when there is an image)."""
        if self.no_prompt and self.image is not None:
            return IMAGE_MARKER
        return render(self.template, query, self.history, with_image=self.image is not None)

    def add_turn(self, query: str, answer: str) -> None:
        self.history.append((query, answer))

    def clear(self) -> None:
        self.image, self.history = None, []
