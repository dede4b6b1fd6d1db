"""Example client for openai_api.py, with the official `openai` package: a two-turn chat about an image.

    python openai_demo/openai_api.py --from_pretrained cogvlm-chat-v1.1 --bf16      # in one shell
    python openai_demo/openai_api_request.py                                        # in another
    python openai_demo/openai_api_request.py --image photo.jpg --stream

The image is a local file (sent inline as a base64 data URI) or an http(s) URL (the server fetches it);
without --image, a picture that ships with the toolkit. The server's address is --base_url, else
$OPENAI_BASE_URL (the openai package's variable), else this machine's port 8000 (openai_api.py's default).
"""
import argparse
import base64
import mimetypes
import os
import sys

import openai

DEFAULT_QUESTIONS = ["What's in this image?", "Describe it in more detail."]
DEFAULT_IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "scene_1.png")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def image_url_for(image: str) -> str:
    """A local path -> data:image/...;base64 URI; an http(s) URL is passed through."""
    if image.startswith(("http://", "https://", "data:")):
        return image
    mime = mimetypes.guess_type(image)[0] or "image/png"
    with open(image, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def ask(client: openai.OpenAI, model: str, messages: list, args) -> str:
    """Send the conversation; print the answer (as it arrives with --stream) and return it."""
    settings = dict(model=model, messages=messages, temperature=args.temperature)
    if args.max_tokens is not None:  # left out, the server answers up to what its context allows
        settings["max_tokens"] = args.max_tokens
    print("Assistant: ", end="", flush=True)
    if not args.stream:
        answer = client.chat.completions.create(**settings).choices[0].message.content
        print(answer)
        return answer
    parts = []
    for chunk in client.chat.completions.create(stream=True, **settings):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(parts[-1], end="", flush=True)
    print()
    return "".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a CogVLM OpenAI-compatible server")
    parser.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
                        help=f"the server's /v1 address (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    parser.add_argument("--api_key", default=os.environ.get("COGVLM_API_KEY", "none"),
                        help="the server's --api-key (default: $COGVLM_API_KEY)")
    parser.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    parser.add_argument("--image", default=DEFAULT_IMAGE,
                        help="image file or http(s) URL (default: the toolkit's assets/scene_1.png)")
    parser.add_argument("--question", action="append", help="a question (repeat for more turns)")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="answer length cap (default: as long as the server's context allows)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = parser.parse_args(argv)

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
        image_part = {"type": "image_url", "image_url": {"url": image_url_for(args.image)}}
        messages = []
        for turn, question in enumerate(args.question or DEFAULT_QUESTIONS):
            print(f"User: {question}")
            # the image goes with the first question; later turns refer back to it
            content = [{"type": "text", "text": question}] + ([image_part] if turn == 0 else [])
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": ask(client, model, messages, args)})
    except (openai.APIError, OSError) as e:
        body = getattr(e, "body", None)
        message = body.get("message", e) if isinstance(body, dict) else getattr(e, "message", e)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
