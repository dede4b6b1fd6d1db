"""Chat with CogVLM in the terminal.

    python cli_demo.py --from_pretrained cogvlm-chat-v1.1 --version chat --english --bf16

Enter an image path or URL (or just Enter for a text-only chat), then questions. `clear` starts
over, `stop` ends. Scriptable: answers can be piped on stdin; it exits cleanly at end of input.
In one process the turns run on the serving engine (utils/engine.py), so each turn reuses what the
conversation computed before (--prefix_cache_gb). Under torchrun the model is split across processes; rank 0
reads input and prints answers.
"""
import argparse
import sys
from typing import Callable, Optional

import torch

from models.errors import CogVLMError
from utils.cli import add_inference_args, run_main, setup_logging
from utils.engine_args import EngineArgs
from utils.grounding import add_grounding_args, next_output_path, render_grounding
from utils.media import add_media_args, media_policy
from utils.vision import load_image

TEXTS = {
    "english": {
        "welcome": 'Welcome to CogVLM-CLI. Enter an image URL or local file path to load an image. Continue inputting '
                   'text to engage in a conversation. Type "clear" to start over, or "stop" to end the program.',
        "image": "Please enter the image path or URL (press Enter for plain text conversation): ",
        "user": "User: ",
        "model": "Model: ",
        "grounding": "Grounding result saved to {}",
    },
    "chinese": {
        "welcome": "欢迎使用 CogVLM-CLI ，输入图像URL或本地路径读图，继续输入内容对话，clear 重新开始，stop 终止程序",
        "image": "请输入图像路径或URL（回车进入纯文本对话）： ",
        "user": "用户：",
        "model": "模型：",
        "grounding": "定位结果已保存到 {}",
    },
}


class Console:
    """Reads lines on rank 0 and shares them with the other ranks (they must run the same steps).

    Under torchrun every rank holds a share of the model and runs every forward, so every decision
    (the input line, `clear`, `stop`, end of input, a failed turn) is rank 0's or agreed by all.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        # a person typing may retry after bad input; a script fails fast (decided by rank 0's stdin)
        self.interactive = self._from_rank0(sys.stdin.isatty() if rank == 0 else None)

    def _from_rank0(self, value):
        if self.world_size > 1:
            shared = [value]
            torch.distributed.broadcast_object_list(shared, src=0)
            value = shared[0]
        return value

    def read(self, prompt: str):
        """The next input line, or None at end of input. A line that is not valid UTF-8 is skipped with a
        message when a person types; from a script it is an error (CogVLMError, on every rank)."""
        line = None
        while self.rank == 0:
            try:
                line = input(prompt)
                line.encode("utf-8")  # undecodable bytes come as lone surrogates under the POSIX locale
            except EOFError:
                print()
            except (UnicodeDecodeError, UnicodeEncodeError):
                message = "input is not valid UTF-8 text; save it as UTF-8 or set the terminal to UTF-8"
                if self.interactive:
                    print(f"error: {message}; line skipped", flush=True)
                    continue
                line = ("bad input", message)
            break
        line = self._from_rank0(line)
        if isinstance(line, tuple):
            raise CogVLMError(line[1])
        return None if line is None else line.strip()

    def first_error(self, error: Optional[Exception]) -> Optional[str]:
        """The message of the first rank whose step failed, or None: the same answer on every rank,
        so that all ranks take the same branch (e.g. an image URL that failed on one rank only)."""
        message = None if error is None else str(error)
        if self.world_size > 1:
            messages = [None] * self.world_size
            torch.distributed.all_gather_object(messages, message)
            message = next((m for m in messages if m is not None), None)
        return message

    def attempt(self, step: Callable):
        """(step(), None), or (None, message) when it raised CogVLMError on any rank; the message is said once.
        Every rank gets the same outcome, so all take the same branch."""
        result, error = None, None
        try:
            result = step()
        except CogVLMError as e:
            error = e
        message = self.first_error(error)
        if message is not None:
            self.say(f"error: {message}")
            return None, message
        return result, None

    def say(self, text: str = "", end: str = "\n"):
        if self.rank == 0:
            print(text, end=end, flush=True)


def run(args) -> int:
    # the model layers load here, after the flags: SAT takes seconds to import (utils/cli.py)
    from utils.engine import engine_for
    from utils.pipeline import load_pipeline

    policy = media_policy(args)
    engine_args = EngineArgs.from_cli_args(args)
    pipeline = load_pipeline(args)
    if pipeline.world_size > 1 and args.prefix_cache_gb is not None:
        raise CogVLMError("--prefix_cache_gb is for one process: under torchrun the CLI generates without the "
                          "serving engine; leave the flag out")
    # one process: the turns run on the serving engine, which keeps what each turn computed for the next one
    # (prefix reuse); under torchrun every rank generates in step (utils.generation) instead
    engine = engine_for(pipeline, engine_args) if pipeline.world_size == 1 else None
    try:
        with torch.no_grad():
            return chat_loop(args, pipeline, policy, engine)
    finally:
        if engine is not None:
            engine.close()


def chat_loop(args, pipeline, policy, engine) -> int:
    """The image / question loop; the turns generate on `engine` (None: in this thread)."""
    texts = TEXTS[args.language]
    console = Console(pipeline.rank, pipeline.world_size)
    grounding = args.grounding or pipeline.grounding
    console.say(texts["welcome"])
    while True:
        image_path = console.read(texts["image"])
        if image_path is None or image_path == "stop":
            return 0
        if image_path == "clear":
            continue
        image, failed = console.attempt(lambda: load_image(image_path, policy=policy) if image_path else None)
        if failed:
            if not console.interactive:
                return 1  # scripted: a bad input is a failure, not something to retry
            continue
        conversation = pipeline.conversation(image)
        query = console.read(texts["user"])
        while True:
            if query is None or query == "stop":
                return 0
            if query == "clear":
                break
            turn, failed = console.attempt(lambda: pipeline.chat(conversation, query, engine=engine))
            if failed:
                if not console.interactive:
                    return 1
                break
            if args.stream_chat:
                console.say(texts["model"], end="")
                for delta in turn:
                    console.say(delta, end="")
                console.say()
            else:
                for _ in turn:
                    pass
                console.say(texts["model"] + turn.response)
            if grounding and pipeline.rank == 0 and conversation.image is not None:
                picture = render_grounding(conversation.image, turn.response, query)
                if picture is not None:
                    path = next_output_path(args.grounding_dir)
                    picture.save(path)
                    console.say(texts["grounding"].format(path))
            query = console.read(texts["user"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CogVLM command-line chat")
    add_inference_args(parser)
    parser.add_argument("--stream_chat", action="store_true", help="print the answer as it is generated")
    add_grounding_args(parser)
    add_media_args(parser)
    EngineArgs.add_cli_args(parser, timeout=False, batching=False)
    parser.add_argument("--grounding_dir", type=str, default="grounding_output",
                        help="where --grounding saves the pictures with the boxes drawn")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_main(lambda: run(args), on_interrupt=lambda stop: f"stopped ({stop})")


if __name__ == "__main__":
    raise SystemExit(main())
