"""web_demo.py: the chat handlers in-process, the app in a subprocess through gradio_client, and the
page in headless Chromium (playwright)."""
import os
import re
import sys
import unicodedata

import pytest

import utils.pipeline
import torch
from PIL import Image

import web_demo
from conftest import ROOT, free_port, running_server
from utils.engine import engine_for
from utils.engine_args import EngineArgs
from utils.chat import ChatStream, chat
from utils.generation_config import GenerationConfig
from utils.grounding import to_pixels
from utils.pipeline import load_pipeline

NEW_TOKENS = 16
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.environ.get("TEST_ARTIFACTS_DIR", os.path.join(ROOT, "test-artifacts"))


def expected_answer(golden, tokenizers, name):
    ids = golden[f"{name}.gen_ids"].tolist()
    return tokenizers["chat"].decode(ids, skip_special_tokens=True).replace("</s>", "").strip()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small to share across threads: on a busy 2-core machine
    two threads made generation 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# In-process: the handlers behind the page -----------------------------------------------------

MAX_LENGTH = 120


@pytest.fixture(scope="module")
def web_chat(golden):
    def make(*flags):
        args = web_demo.build_parser().parse_args(flags_for_golden + list(flags))
        return web_demo.WebChat(bundle, args, engine_for(bundle, EngineArgs.from_cli_args(args)))

    flags_for_golden = ["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir,
                        "--max_length", str(MAX_LENGTH)]
    bundle = load_pipeline(web_demo.build_parser().parse_args(flags_for_golden))
    return make


def run_turn(web, image, question, conversation, grounding=False):
    """All the page's updates (messages, conversation, question box, error box) for one Generate."""
    return list(web.respond(image, question, conversation, 0.8, 0.4, 1, grounding))


def page_error(web, image, question, conversation):
    """The error line the page shows for this Generate (None when it shows none)."""
    (update,) = run_turn(web, image, question, conversation)
    messages, _, question_box, error = update
    assert question_box == question and messages == conversation.messages()  # nothing lost: fix and retry
    return error.value if error.visible else None


def test_multi_turn_streams_and_matches_the_chat_core(web_chat, golden, monkeypatch):
    web = web_chat()
    # the random tiny model never says eos: stop each answer after 4 tokens with the golden 5th token
    stop_id = int(golden["chat.gen_ids"][4])
    monkeypatch.setattr(web, "_config", lambda t, p, k: GenerationConfig(max_length=MAX_LENGTH, end_token_ids=[stop_id]))
    conversation = web_demo.WebSession()
    updates = run_turn(web, golden.image_path, "What is in the image?", conversation)
    assert len(updates) >= 3, "the answer was not streamed"
    messages, conversation, question_box, error = updates[-1]
    assert question_box == "" and len(conversation.history) == 1 and not error.visible
    streamed = [m[-1]["content"] for m, _, _, _ in updates[:-1]]
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:])) and streamed[-1] == messages[-1]["content"]

    messages, conversation, _, _ = run_turn(web, golden.image_path, "What color is the sky?", conversation)[-1]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    expected, expected_history, _ = chat(golden.image_path, web.pipeline.model, web.pipeline.processor.text,
                                         web.pipeline.processor.image, "What color is the sky?",
                                         history=conversation.history[:1], max_length=MAX_LENGTH, top_k=1,
                                         repetition_penalty=1.0, end_token_ids=[stop_id])
    assert conversation.history == expected_history and messages[-1]["content"] == expected

    # another image starts a new conversation
    other = os.path.join(ROOT, "assets", "shapes.png")
    messages, conversation, _, _ = run_turn(web, other, "What is in the image?", conversation)[-1]
    assert len(conversation.history) == 1 and len(messages) == 2


def test_bad_input_is_a_page_error_with_the_message(web_chat, tmp_path):
    import gradio as gr

    web = web_chat()
    assert "type a question" in page_error(web, None, "  ", web_demo.WebSession())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    assert "not a readable image" in page_error(web, str(broken), "hi", web_demo.WebSession(image_path=str(broken)))
    assert f"--max_length is {MAX_LENGTH}" in page_error(web, None, "hello " * 300, web_demo.WebSession())
    with pytest.raises(gr.Error, match=r"list of \[question, answer\] pairs"):
        web.api_chat(None, "hi", [["only a question"]], 0.8, 0.4, 1)
    with pytest.raises(gr.Error, match="not a readable image"):
        web.api_chat(str(broken), "hi", [], 0.8, 0.4, 1)


GROUNDED_ANSWER = "A woman [[100,200,500,900]] holds a pear [[600,500,700,650]]."


class GroundedAnswerStream(ChatStream):
    """The real chat turn (the tiny model answers noise), with a grounding answer put in its place."""

    def __iter__(self):
        yield from super().__iter__()
        self.response = GROUNDED_ANSWER
        self.conversation.history[-1] = (self.conversation.history[-1][0], GROUNDED_ANSWER)


def test_grounding_checkpoint_shows_the_drawn_picture_in_the_chat(web_chat, golden, monkeypatch):
    monkeypatch.setattr(utils.pipeline, "ChatStream", GroundedAnswerStream)
    web = web_chat("--grounding")
    assert web.grounding  # the page's checkbox starts ticked
    messages, conversation, _, _ = run_turn(web, golden.image_path, "Where is the pear?", web_demo.WebSession(),
                                            grounding=True)[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    picture = conversation.pictures[0]
    original = Image.open(golden.image_path).convert("RGB")
    x0, y0, x1, y1 = to_pixels((600, 500, 700, 650), *original.size)
    assert picture.size == original.size and picture.getpixel((x0, (y0 + y1) // 2)) != original.getpixel((x0, (y0 + y1) // 2))
    # the same answer without grounding mode: no picture
    messages, _, _, _ = run_turn(web, golden.image_path, "Where is the pear?", web_demo.WebSession())[-1]
    assert len(messages) == 2


# The app in a subprocess: gradio_client ---------------------------------------------------

@pytest.fixture(scope="module")
def app_url(golden):
    """web_demo.py on the golden checkpoint; --max_length leaves exactly 16 answer tokens to chat_hist."""
    port = free_port()
    max_length = golden.case("chat_hist")["seq_len"] + NEW_TOKENS
    log_path = os.path.join(ROOT, ".pytest_cache", "web_demo_server.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    command = [sys.executable, "web_demo.py", "--from_pretrained", golden.checkpoint, "--local_tokenizer",
               golden.tokenizer_dir, "--version", "chat", "--max_length", str(max_length),
               "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with running_server(command, url, log_path, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
                                                    "OMP_NUM_THREADS": "1"}):
        yield url


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_api_chat_answers_and_second_turn_uses_the_history(client, golden, tokenizers):
    from gradio_client import handle_file

    api = client.view_api(return_format="dict")["named_endpoints"]
    assert list(api["/chat"]["parameters"][i]["parameter_name"] for i in range(3)) == ["image", "question", "history"]
    answer, history = client.predict(handle_file(golden.image_path), golden.case("chat")["query"], [],
                                     api_name="/chat")
    # the server's --max_length leaves more than 16 tokens here: the golden greedy answer starts it
    assert answer.startswith(expected_answer(golden, tokenizers, "chat")) and len(answer) > 10
    assert history == [[golden.case("chat")["query"], answer]]

    case = golden.case("chat_hist")
    answer, history = client.predict(handle_file(golden.image_path), case["query"], case["history"], api_name="/chat")
    assert answer == expected_answer(golden, tokenizers, "chat_hist")
    assert history == case["history"] + [[case["query"], answer]]


def test_api_chat_text_only_and_clear_errors(client):
    from gradio_client.exceptions import AppError

    answer, history = client.predict(None, "Hello, who are you?", [], api_name="/chat")
    assert isinstance(answer, str) and history == [["Hello, who are you?", answer]]
    with pytest.raises(AppError, match="--max_length is 93"):
        client.predict(None, "hello " * 100, [], api_name="/chat")
    with pytest.raises(AppError, match="history must be a list"):
        client.predict(None, "hi", {"not": "a list"}, api_name="/chat")


def _user_texts(messages):
    """The user turns of the chat the page shows (gradio sends each content as a list of parts)."""
    return ["".join(part["text"] for part in m["content"] if part.get("type") == "text")
            for m in messages if m["role"] == "user"]


def _error_line(update):
    """The page's error line from a client result (an update of the Markdown), or None when hidden."""
    if isinstance(update, dict):
        return update.get("value") if update.get("visible", True) else None
    return update


def test_page_sessions_are_separate_and_clear_resets(app_url, golden):
    from gradio_client import Client, handle_file

    alice, bob = Client(app_url, verbose=False), Client(app_url, verbose=False)
    sampling = (0.8, 0.4, 1, False)  # temperature, top_p, top_k, grounding (the page's own endpoint: positional)
    messages, _, error = alice.predict(handle_file(golden.image_path), "What is in the image?", *sampling,
                                       api_name="/generate")
    assert [m["role"] for m in messages] == ["user", "assistant"] and _error_line(error) is None
    # Alice's next turn carries her first answer, which filled the context (the random model never says eos)
    messages, question_box, error = alice.predict(handle_file(golden.image_path), "What color is the sky?",
                                                  *sampling, api_name="/generate")
    assert re.search(r"error:\*\* prompt is \d+ tokens .* --max_length is 93", _error_line(error))
    assert _user_texts(messages) == ["What is in the image?"] and question_box == "What color is the sky?"
    # Bob's session has none of Alice's history
    messages, _, error = bob.predict(None, "Hello, who are you?", *sampling, api_name="/generate")
    assert _user_texts(messages) == ["Hello, who are you?"] and _error_line(error) is None
    # after Clear, Alice's question fits again
    alice.predict(api_name="/clear")
    messages, _, error = alice.predict(handle_file(golden.image_path), "What color is the sky?", *sampling,
                                       api_name="/generate")
    assert _user_texts(messages) == ["What color is the sky?"] and _error_line(error) is None


# The page in a real browser ---------------------------------------------------------------

def _visible_text(text):
    """Text as a page shows it: no whitespace, control or replacement characters."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c)[0] != "C" and c != "\ufffd")


def test_browser_upload_ask_generate_and_see_the_answer(app_url, client, golden):
    from gradio_client import handle_file
    from playwright.sync_api import expect, sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Chromium is not installed at {CHROMIUM} and could not be installed "
                    "(scripts/install_test_browser.sh: apt-get install chromium)")
    question = golden.case("chat")["query"]
    expected, _ = client.predict(handle_file(golden.image_path), question, [], api_name="/chat")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, ".gitignore"), "w") as f:
        f.write("*\n")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app_url)
            page.locator("input[type=file]").first.set_input_files(golden.image_path)
            expect(page.locator("img[src*='image.png']").first).to_be_visible(timeout=20_000)
            page.get_by_label("Question").fill(question)
            page.get_by_role("button", name="Generate").click()
            bot = page.locator("[data-testid='bot']").first
            expect(bot).to_be_visible(timeout=60_000)
            expect(page.get_by_label("Question")).to_have_value("", timeout=60_000)
            page.wait_for_function("() => !document.querySelector('.generating')", timeout=60_000)
            page.screenshot(path=os.path.join(ARTIFACTS, "web_demo.png"), full_page=True)
            assert page.locator("[data-testid='user']").first.inner_text().strip() == question
            assert _visible_text(bot.inner_text()) == _visible_text(expected)

            # bad input (sent with Enter) shows its own message in the page, not a bare "Error"; the chat stays
            page.get_by_label("Question").fill("hello " * 100)
            page.get_by_label("Question").press("Enter")
            expect(page.locator("#error")).to_contain_text(re.compile(r"error: prompt is \d+ tokens"), timeout=30_000)
            expect(page.locator("#error")).to_contain_text("--max_length is 93")
            assert _visible_text(bot.inner_text()) == _visible_text(expected)
            page.screenshot(path=os.path.join(ARTIFACTS, "web_demo_error.png"), full_page=True)
        finally:
            browser.close()
