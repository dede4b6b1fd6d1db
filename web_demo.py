"""Chat with CogVLM in the browser (gradio).

    python web_demo.py --from_pretrained cogvlm-chat-v1.1 --version chat --english --bf16
    python web_demo.py --from_pretrained cogvlm-grounding-generalist --version base --english --bf16

Upload an image (or none, for a text-only chat), ask, and the answer streams into the chat; later
questions continue the conversation about the same image. A new image starts a new conversation.
With a grounding checkpoint (or --grounding) the boxes of the answer are drawn into the chat.

Each browser session has its own conversation (gr.State); their generations share batches on one
serving engine (utils/engine.py: up to --max_batch_size at once). The same chat is an API for
`gradio_client` (api_name="chat"):

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    answer, history = client.predict(handle_file("assets/shapes.png"), "What is in the image?", [],
                                     api_name="/chat")
    answer, history = client.predict(handle_file("assets/shapes.png"), "Which colour is the circle?",
                                     history, api_name="/chat")
"""
import argparse
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

import gradio as gr

from models.errors import CogVLMError, PromptError, SamplingError
from utils.cli import add_inference_args, run_main, setup_logging, single_process
from utils.engine_args import EngineArgs
from utils.generation_config import GenerationConfig
from utils.grounding import add_grounding_args, render_grounding
from utils.media import add_media_args, media_policy
from utils.vision import MAX_IMAGE_BYTES, load_image

if TYPE_CHECKING:  # annotations only: the model layers load in main, after the flags (utils/cli.py)
    from utils.chat import ChatStream
    from utils.conversation import Conversation, History
    from utils.engine import Engine
    from utils.pipeline import InferencePipeline

logger = logging.getLogger(__name__)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
ERROR_CSS = ".error-box { color: #b91c1c; border: 1px solid #fca5a5; border-radius: 6px; padding: 4px 10px; }"
MODEL_QUEUE = "model"  # every event that runs the model shares this concurrency group (--max_batch_size)

TEXTS = {
    "english": {
        "title": "CogVLM",
        "intro": "Upload an image (or none for a text-only chat), ask a question and press Generate. "
                 "Follow-up questions continue the conversation; a new image or Clear starts over.",
        "image": "Image", "question": "Question", "chat": "Chat", "generate": "Generate", "clear": "Clear",
        "grounding": "Grounding: draw the boxes of the answer",
        "empty": "type a question (or upload an image to describe)",
    },
    "chinese": {
        "title": "CogVLM",
        "intro": "上传图片（或不上传，进行纯文本对话），输入问题并点击生成。后续问题延续对话；换图或清除会重新开始。",
        "image": "图片", "question": "问题", "chat": "对话", "generate": "生成", "clear": "清除",
        "grounding": "定位：在图上画出回答中的框",
        "empty": "请输入问题（或上传图片）",
    },
}
# Scenes in the vocabulary of checkpoints/cogvlm-tiny-scenes (rendered by scripts/make_scene_dataset.py's
# render_scene(random.Random(4)) and (3): a yellow triangle and purple, blue and red circles; an orange square
# and a green star), questions that any CogVLM answers too.
EXAMPLES = {
    "chat": [["scene_1.png", "How many circles are there?"],
             ["scene_2.png", "What colour is the triangle?"],
             ["scene_1.png", "Is the red circle to the left of the yellow triangle?"]],
    "grounding": [["scene_1.png", "Where is the red circle?"],
                  ["scene_2.png", "Describe the image."]],
}


def _upload_path(payload):
    """An upload's file path (or data: URI), undecoded."""
    if payload is None:
        return None
    if payload.path is None and payload.url and payload.url.startswith("data:"):
        return payload.url
    return payload.path


def _url_passed_on(move_to_cache):
    """gradio's move of an input file into its cache, except that an http(s) URL is passed on as it is:
    utils.vision.load_image fetches it under the --*media* flags and its time and byte caps (gradio would
    download it itself, to disk, uncapped)."""
    def move(url_or_path):
        if isinstance(url_or_path, str) and url_or_path.lower().startswith(("http://", "https://")):
            return url_or_path
        return move_to_cache(url_or_path)

    async def async_move(url_or_path):
        if isinstance(url_or_path, str) and url_or_path.lower().startswith(("http://", "https://")):
            return url_or_path
        return await move_to_cache(url_or_path)

    return async_move if inspect.iscoroutinefunction(move_to_cache) else move


def image_input(**kwargs) -> gr.Image:
    """A gr.Image whose upload reaches the handler as its file path (an image URL a client sends, as that URL),
    for utils.vision.load_image to read with its caps, its media policy and one-line errors; gradio's own
    preprocessing would open any file with PIL, uncapped, and answer a non-image with a multi-line "Could not
    preprocess input component" message. (Set on the instance: for a subclass of a component gradio writes a
    .pyi stub next to this file.)"""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = _upload_path
    image.move_resource_to_block_cache = _url_passed_on(image.move_resource_to_block_cache)
    image.async_move_resource_to_block_cache = _url_passed_on(image.async_move_resource_to_block_cache)
    return image


@dataclass
class WebSession:
    """One browser session's chat (held in gr.State, so sessions never share it)."""
    conversation: Optional["Conversation"] = None   # None until the first question
    image_path: Optional[str] = None     # the upload the conversation's image came from: another starts over
    pictures: Dict[int, object] = field(default_factory=dict)  # turn index -> grounding picture (PIL)

    @property
    def history(self) -> "History":
        return self.conversation.history if self.conversation is not None else []

    def messages(self, pending_question: Optional[str] = None, pending_answer: str = "") -> List[dict]:
        """The chat as gradio messages, with the turn being generated at the end."""
        messages = []
        for turn, (question, answer) in enumerate(self.history):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if turn in self.pictures:
                messages.append({"role": "assistant", "content": gr.Image(self.pictures[turn])})
        if pending_question is not None:
            messages += [{"role": "user", "content": pending_question},
                         {"role": "assistant", "content": pending_answer}]
        return messages


class WebChat:
    """The chat handlers of the page and the API, on one loaded model and its serving engine."""

    def __init__(self, pipeline: "InferencePipeline", args, engine: "Engine"):
        self.pipeline, self.args, self.engine = pipeline, args, engine
        self.grounding = args.grounding or pipeline.grounding
        self.texts = TEXTS[args.language]
        self.media = media_policy(args)

    def _config(self, temperature: float, top_p: float, top_k: int) -> GenerationConfig:
        if top_k is None or temperature is None or top_p is None:
            raise SamplingError("temperature, top_p and top_k need a value (leave them out for the defaults)")
        try:
            return self.pipeline.defaults.replace(temperature=float(temperature), top_p=float(top_p),
                                                  top_k=int(top_k)).validate(self.pipeline.vocab_size)
        except (TypeError, ValueError, OverflowError):
            raise SamplingError(f"temperature, top_p and top_k must be numbers, got {temperature!r}, {top_p!r}, "
                                f"{top_k!r}") from None

    def _start(self, image_path, question: str, conversation: Optional["Conversation"], config) -> "ChatStream":
        """A chat turn; bad input (image, prompt length, no question, settings) raises CogVLMError."""
        question = (question or "").strip()
        if not question and not image_path and not self.args.no_prompt:
            raise PromptError(self.texts["empty"])
        if conversation is None:
            conversation = self.pipeline.conversation(load_image(image_path, policy=self.media) if image_path else None)
        return self.pipeline.chat(conversation, "" if self.args.no_prompt else question, config, self.engine)

    def respond(self, image_path, question, session: WebSession, temperature, top_p, top_k, grounding):
        """The page's Generate: stream the answer into the chat.

        Yields (chat messages, session, question box, error box). Errors go to the error box above the
        chat, which keeps its history, and the question stays to be edited.
        """
        if image_path != session.image_path:
            session = WebSession(image_path=image_path)
        try:
            stream = self._start(image_path, question, session.conversation, self._config(temperature, top_p, top_k))
        except CogVLMError as e:
            yield session.messages(), session, question, error_box(str(e))
            return
        session.conversation = stream.conversation
        question, answer = (question or "").strip(), ""
        try:
            for delta in stream:
                answer += delta
                yield session.messages(question, answer), session, "", error_box(None)
        except Exception as e:  # noqa: BLE001 - the page says what failed instead of a bare "Error"
            logger.exception("generation failed")
            yield session.messages(), session, question, error_box(
                f"generation failed ({type(e).__name__}: {e}); see the server log")
            return
        picture = session.conversation.image
        if grounding and picture is not None:
            drawn = render_grounding(picture, stream.response, question)
            if drawn is not None:
                session.pictures[len(session.history) - 1] = drawn
        yield session.messages(), session, "", error_box(None)

    def api_chat(self, image, question, history, temperature, top_p, top_k):
        """The API (api_name="chat"): an image file (or None), a question and the history so far
        ([[question, answer], ...], or empty) -> (answer, history with this turn). Bad input
        comes back to the client as an error with its message."""
        try:
            conversation = self.pipeline.conversation(load_image(image, policy=self.media) if image else None)
            conversation.history = _checked_history(history)
            stream = self._start(image, question, conversation, self._config(temperature, top_p, top_k))
        except CogVLMError as e:
            raise gr.Error(str(e)) from None
        for _ in stream:
            pass
        return stream.response, [list(turn) for turn in conversation.history]


def _checked_history(history) -> "History":
    if not history:
        return []
    if not isinstance(history, list) or not all(isinstance(turn, (list, tuple)) and len(turn) == 2 and
                                                all(isinstance(text, str) for text in turn) for turn in history):
        raise PromptError("history must be a list of [question, answer] pairs of strings (the history the "
                          "previous call returned, or [] to start)")
    return [(question, answer) for question, answer in history]


def error_box(message: Optional[str]):
    """The page's error line: shown with `message`, hidden for None."""
    if message is None:
        return gr.Markdown(visible=False)
    return gr.Markdown(value=f"**error:** {message}", visible=True)


def new_conversation():
    """Clear / a new image: an empty chat, a fresh conversation, no error."""
    return [], WebSession(), error_box(None)


def build_demo(chat: WebChat) -> gr.Blocks:
    texts, args = chat.texts, chat.args
    examples = EXAMPLES["grounding" if chat.grounding else "chat"]
    with gr.Blocks(title=texts["title"]) as demo:
        gr.Markdown(f"# {texts['title']}\n{texts['intro']}")
        conversation = gr.State(WebSession())
        with gr.Row():
            with gr.Column(scale=2):
                image = image_input(label=texts["image"], height=320)
                temperature = gr.Slider(0.01, 2.0, value=args.temperature, step=0.01, label="Temperature")
                top_p = gr.Slider(0.0, 1.0, value=args.top_p, step=0.01, label="Top P")
                top_k = gr.Slider(1, 100, value=args.top_k, step=1, label="Top K (1: greedy)")
                grounding = gr.Checkbox(value=chat.grounding, label=texts["grounding"])
            with gr.Column(scale=3):
                error = gr.Markdown(visible=False, elem_id="error", elem_classes=["error-box"])
                chatbot = gr.Chatbot(label=texts["chat"], height=480)
                question = gr.Textbox(label=texts["question"], lines=1, max_lines=8)  # one line: Enter sends
                with gr.Row():
                    generate = gr.Button(texts["generate"], variant="primary")
                    clear = gr.Button(texts["clear"])
        gr.Examples([[os.path.join(ASSETS, name) if name else None, text] for name, text in examples],
                    inputs=[image, question])

        generate_inputs = [image, question, conversation, temperature, top_p, top_k, grounding]
        generate_outputs = [chatbot, conversation, question, error]
        # as many generating events at once as the engine batches; the others wait in gradio's queue
        model_events = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=args.max_batch_size)
        # the page's own events stay callable by clients (per client session), but undocumented
        generate.click(chat.respond, generate_inputs, generate_outputs, api_name="generate",
                       api_visibility="undocumented", **model_events)
        question.submit(chat.respond, generate_inputs, generate_outputs, api_visibility="private", **model_events)
        clear.click(new_conversation, None, [chatbot, conversation, error], api_name="clear",
                    api_visibility="undocumented", queue=False)
        image.change(new_conversation, None, [chatbot, conversation, error], api_visibility="private", queue=False)

        # the API's own (hidden) inputs and outputs: stateless, the client carries the history
        with gr.Group(visible=False):
            api_inputs = [image_input(label="image"), gr.Textbox(label="question"),
                          gr.JSON(value=[], label="history"),
                          gr.Number(value=args.temperature, label="temperature"),
                          gr.Number(value=args.top_p, label="top_p"),
                          gr.Number(value=args.top_k, precision=0, label="top_k")]
            api_outputs = [gr.Textbox(label="answer"), gr.JSON(label="history")]
        gr.Button(visible=False).click(chat.api_chat, api_inputs, api_outputs, api_name="chat", **model_events)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CogVLM web demo (gradio)")
    add_inference_args(parser)
    add_grounding_args(parser)
    EngineArgs.add_cli_args(parser, timeout=False)
    add_media_args(parser)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(lambda: serve(args))


def serve(args) -> int:
    # the model layers load here, after the flags: SAT takes seconds to import (utils/cli.py)
    from utils.engine import engine_for
    from utils.pipeline import load_pipeline

    single_process("web_demo.py", " (the CLI, cli_demo.py, splits the model across GPUs)")
    engine_args = EngineArgs.from_cli_args(args)
    media_policy(args)  # contradictory media flags fail before the model loads
    pipeline = load_pipeline(args)
    engine = engine_for(pipeline, engine_args)
    try:
        demo = build_demo(WebChat(pipeline, args, engine))
        demo.queue(max_size=args.max_waiting).launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_IMAGE_BYTES,
            allowed_paths=[ASSETS], css=ERROR_CSS, show_error=True)  # an unexpected failure reaches API clients
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
