"""llama.cpp side by side with ours on the same CogVLM: an independent implementation as an oracle, and the
CPU peer to beat.

    python bench/llamacpp.py                # config M: decode tok/s (batch 1) and image-prompt prefill, ours
                                            # fp32/bf16/int8/int4 against llama.cpp F32/BF16/Q8_0/Q4_0
    python bench/llamacpp.py --check        # config M: llama.cpp (f32 export) against ours, text and image prompts
    python bench/llamacpp.py --config tiny --rounds 1 --new_tokens 4

Both sides load one random-weight SAT checkpoint written here (ours through load_model, as the front ends
do; llama.cpp from the GGUF files scripts/convert_checkpoint.py makes of it) and run the same prompt:
[bos] + image block + 24 text tokens. llama.cpp runs through llama-cpp-python's bindings: the language model
through `llama_decode`, the image through libmtmd (the binding's multimodal path), with llama.cpp's own
defaults (F16 KV cache, flash attention where it chooses) in the bench and an F32 KV cache without flash
attention as the oracle. Every row runs in a fresh process, rows interleaved round by round (as
bench/generate.py). The last line is `ours/llama.cpp decode: fp32 A.AAx bf16 B.BBx int8 C.CCx int4 D.DDx`.

How llama.cpp lays out an image prompt (libmtmd + src/models/cogvlm.cpp), unlike CogVLM (utils/language.py):
positions run on through the image block (boi 1, patches 2..L+1, eoi L+2, text from L+3; CogVLM: patches
share position 2, text from 4), and the visual expert takes every position of the image block, eoi
included (CogVLM: boi and patches only). `llamacpp_layout` builds our inputs that way; `--check` measures
both differences.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import llama_cpp
from llama_cpp import _logger as llama_logger
from llama_cpp import mtmd_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRECISIONS = {  # ours (dtype, --quant) and the llama.cpp export of the same precision
    "fp32": (("fp32", 0), "f32"), "bf16": (("bf16", 0), "bf16"), "int8": (("fp32", 8), "q8_0"),
    "int4": (("fp32", 4), "q4_0")}
TEXT_TOKENS = 24


def quiet_llama_cpp() -> None:
    """llama.cpp and libmtmd log every load and graph to stderr: keep errors only."""
    llama_logger.set_verbose(False)
    mtmd_cpp.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


class LlamaCpp:
    """One llama.cpp CogVLM (language model GGUF + mmproj GGUF) with one context holding one sequence.

    exact: F32 KV cache and no flash attention (the oracle); otherwise llama.cpp's defaults.
    extra_buffers: llama.cpp's repacked weight layouts (`use_extra_bufts`, on by default; off = llama-cli's
    --no-repack). On this AMX CPU they put Q8_0 / Q4_0 matrices in ggml's AMX buffer, whose product segfaults
    for batches of more than one row (ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36); one-row batches work.
    ubatch: llama.cpp's micro-batch (default: the whole context).
    """

    def __init__(self, model_path: str, mmproj_path: Optional[str] = None, threads: int = 2, context: int = 1024,
                 exact: bool = True, extra_buffers: bool = True, ubatch: Optional[int] = None):
        quiet_llama_cpp()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = context
        params.n_ubatch = ubatch or context
        params.n_threads = params.n_threads_batch = threads
        if exact:
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.batch_size = context
        self.mtmd = None
        if mmproj_path:
            mparams = mtmd_cpp.mtmd_context_params_default()
            mparams.use_gpu, mparams.n_threads = False, threads
            if exact:
                mparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            self.mtmd = mtmd_cpp.mtmd_init_from_file(mmproj_path.encode(), self.model, mparams)
            if not self.mtmd:
                raise RuntimeError(f"libmtmd could not load {mmproj_path}")

    def close(self) -> None:
        if self.mtmd:
            mtmd_cpp.mtmd_free(self.mtmd)
        llama_cpp.llama_free(self.context)
        llama_cpp.llama_model_free(self.model)

    def reset(self) -> None:
        """Forget the sequence (empty KV cache)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.context), True)

    def tokenize(self, text: str, add_bos: bool = False) -> List[int]:
        raw = text.encode()
        tokens = (llama_cpp.llama_token * (len(raw) + 8))()
        count = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), tokens, len(tokens), add_bos, False)
        return list(tokens[:count])

    def decode(self, positions: Sequence[int], tokens: Optional[Sequence[int]] = None,
               embeddings: Optional[np.ndarray] = None, logits: bool = True) -> Optional[np.ndarray]:
        """Append tokens, or embedding rows (n, n_embd) (llama.cpp then uses the visual expert), at `positions`.
        Returns the logits of every appended row (n, n_vocab) if `logits`."""
        count = len(positions)
        batch = llama_cpp.llama_batch_init(count, 0 if embeddings is None else self.n_embd, 1)
        try:
            if embeddings is not None:
                flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i, position in enumerate(positions):
                if embeddings is None:
                    batch.token[i] = tokens[i]
                batch.pos[i], batch.n_seq_id[i], batch.logits[i] = position, 1, logits
                batch.seq_id[i][0] = 0
            batch.n_tokens = count
            if llama_cpp.llama_decode(self.context, batch) != 0:
                raise RuntimeError(f"llama_decode failed at positions {positions[0]}..{positions[-1]}")
        finally:
            llama_cpp.llama_batch_free(batch)
        if not logits:
            return None
        return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.context, i), shape=(self.n_vocab,))
                         for i in range(count)]).copy()

    def _image_chunks(self, pixels: np.ndarray, text: str = ""):
        """libmtmd's chunks for `marker + text` with the image `pixels` (H, W, 3) uint8, and what must stay alive."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        bitmap = mtmd_cpp.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0],
                                           pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        raw = (mtmd_cpp.mtmd_default_marker().decode() + text).encode()
        prompt = mtmd_cpp.mtmd_input_text()
        prompt.text, prompt.text_len, prompt.add_special, prompt.parse_special = raw, len(raw), False, False
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(prompt), bitmaps, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        return chunks, bitmap

    def image_embeddings(self, pixels: np.ndarray) -> np.ndarray:
        """libmtmd's embeddings of an image (H, W, 3) uint8: (L + 2, n_embd) = boi, L adapted patches, eoi."""
        chunks, bitmap = self._image_chunks(pixels)
        try:
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, 0)
            if mtmd_cpp.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            rows = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            return np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(self.mtmd), shape=(rows, self.n_embd)).copy()
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def image_prompt(self, pixels: np.ndarray, text_tokens: Sequence[int], bos: int,
                     all_logits: bool = True) -> Tuple[np.ndarray, int]:
        """Prefill [bos] + image + `text_tokens` the way libmtmd does (mtmd_helper_eval_chunk_single places and
        decodes the image block). Returns (logits of the text tokens (n, n_vocab), or of the last one (1,
        n_vocab) unless `all_logits`; the next position)."""
        self.decode([0], [bos], logits=False)
        chunks, bitmap = self._image_chunks(pixels)
        try:
            next_position = llama_cpp.llama_pos(0)
            image = mtmd_cpp.mtmd_input_chunks_get(chunks, 0)
            if mtmd_cpp.mtmd_helper_eval_chunk_single(self.mtmd, self.context, image, 1, 0, self.batch_size, False,
                                                      ctypes.byref(next_position)) != 0:
                raise RuntimeError("mtmd_helper_eval_chunk_single failed")
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)
        start = next_position.value
        positions = list(range(start, start + len(text_tokens)))
        if all_logits:
            return self.decode(positions, text_tokens), start + len(text_tokens)
        # the last token alone: llama.cpp's CogVLM graph does not pick the output rows (src/models/cogvlm.cpp has
        # no inp_out_ids), so a batch that asks for fewer logits than it has tokens gets its first rows' logits
        self.decode(positions[:-1], text_tokens[:-1], logits=False)
        return self.decode(positions[-1:], text_tokens[-1:]), start + len(text_tokens)

    def greedy(self, last_logits: np.ndarray, next_position: int, new_tokens: int) -> Tuple[List[int], np.ndarray]:
        """Greedy decoding from the prompt's last logits: (tokens, the logits that chose each (new_tokens, n_vocab))."""
        tokens, steps = [], [last_logits]
        for step in range(new_tokens):
            tokens.append(int(np.argmax(steps[-1])))
            if step + 1 < new_tokens:
                steps.append(self.decode([next_position + step], [tokens[-1]])[0])
        return tokens, np.stack(steps)


    def teacher_forced(self, last_logits: np.ndarray, next_position: int, tokens: Sequence[int]) -> np.ndarray:
        """The logits that would choose each of `tokens` after the prompt, given the ones before it:
        (len(tokens), n_vocab), row 0 = `last_logits`."""
        if len(tokens) == 1:
            return last_logits[None]
        rest = self.decode(list(range(next_position, next_position + len(tokens) - 1)), tokens[:-1])
        return np.concatenate([last_logits[None], rest])

    def embedded_image_prompt(self, image_block: np.ndarray, text_tokens: Sequence[int], bos: int
                              ) -> Tuple[np.ndarray, int]:
        """As `image_prompt`, with the image block's embeddings (L + 2, n_embd) given instead of the pixels
        (decoded at libmtmd's positions, 1..L+2)."""
        self.decode([0], [bos], logits=False)
        self.decode(list(range(1, 1 + len(image_block))), embeddings=image_block, logits=False)
        start = 1 + len(image_block)
        return self.decode(list(range(start, start + len(text_tokens))), text_tokens), start + len(text_tokens)


def first_divergence(tokens: Sequence[int], ours_tokens: Sequence[int], ours_logits: np.ndarray,
                     their_logits: np.ndarray) -> str:
    """Where two greedy decodings part, with our top-2 margin and the logit difference at that step."""
    step = next((i for i, (a, b) in enumerate(zip(tokens, ours_tokens)) if a != b), None)
    if step is None:
        return f"all {len(tokens)} equal"
    top2 = np.sort(ours_logits[step])[-2:]
    return (f"equal for {step} of {len(tokens)}; at step {step} our top-2 margin is {top2[1] - top2[0]:.2e} and "
            f"the logits differ by up to {np.abs(their_logits[step] - ours_logits[step]).max():.2e}")


def llamacpp_layout(inputs: Dict) -> Dict:
    """Our model inputs (a processor's output, batch of one) laid out as llama.cpp lays out the prompt: positions
    0..n-1 and the visual expert on the whole image block (eoi included)."""
    import torch

    length = inputs["input_ids"].shape[1]
    return dict(inputs, position_ids=torch.arange(length)[None],
                vision_expert_mask=inputs["image_embed_mask"].clone())


def ours_greedy(model, inputs: Dict, new_tokens: int) -> Tuple[List[int], np.ndarray]:
    """Our greedy decoding of one prompt (input_ids, position_ids, image_embed_mask, vision_expert_mask (1, n),
    images or None) through the KV-cached generation loop, and the logits of one uncached forward over the
    prompt and the tokens (n + new_tokens - 1, vocab): row n - 1 + k chose token k."""
    import torch
    from utils.generation import generate_batch_stream
    from utils.generation_config import GenerationConfig

    length = inputs["input_ids"].shape[1]
    batch = dict(inputs, attention_mask=torch.ones(1, 1, length, length).tril())
    config = GenerationConfig(max_length=length + new_tokens, top_k=1, end_token_ids=[])
    tokens = [int(step[0]) for step, _ in generate_batch_stream(model, batch, config)]
    full = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], 1)
    total, pad = full.shape[1], torch.zeros(1, new_tokens - 1, dtype=torch.long)
    last = inputs["position_ids"][:, -1:]
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones(1, 1, total, total).tril(),
                       position_ids=torch.cat([inputs["position_ids"], last + torch.arange(1, new_tokens)[None]], 1),
                       vision_expert_mask=torch.cat([inputs["vision_expert_mask"], pad], 1),
                       image_embed_mask=torch.cat([inputs["image_embed_mask"], pad], 1),
                       images=inputs.get("images"))[0][0]
    return tokens, logits.float().numpy()


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| (the golden bundle's measure)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# The shared model and prompt -------------------------------------------------------------------------------

TOKENIZER_DIR = os.path.join(ROOT, "tests", "golden", "tiny-small", "tokenizer")  # padded to the vocabulary
PROMPT_FILE = "prompt.pt"


def bench_config(name: str):
    """The CogVLMConfig of bench/generate.py's config `name`."""
    from bench.generate import CONFIGS
    from models.config import CogVLMConfig, VisionConfig

    shape = dict(CONFIGS[name])
    eva = shape.pop("eva")
    return CogVLMConfig(**shape, vision=VisionConfig(**eva))


def random_state_dict(config, seed: int = 0) -> Dict:
    """Random weights of `config`'s model whose logits depend on the input: matrices ~ N(0, 1/fan_in), norms
    near 1, biases small; the standard rotary table."""
    import torch
    from models.checkpoint.layout import ROTARY_KEY, tensor_table
    from models.checkpoint.hf_format import rotary_inv_freq

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for spec in tensor_table(config):
        if spec.sat_key == ROTARY_KEY:
            state[spec.sat_key] = rotary_inv_freq(config)
        elif len(spec.shape) >= 2:
            fan_in = int(np.prod(spec.shape[1:]))
            state[spec.sat_key] = torch.randn(spec.shape, generator=generator) / fan_in ** 0.5
        elif "norm" in spec.sat_key and spec.sat_key.endswith("weight"):
            state[spec.sat_key] = 1 + 0.1 * torch.randn(spec.shape, generator=generator)
        else:
            state[spec.sat_key] = 0.02 * torch.randn(spec.shape, generator=generator)
    return state


def write_bench_model(work_dir: str, config_name: str, outtypes: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """A random-weight SAT checkpoint of `config_name` in work_dir/sat and its GGUF exports
    ({outtype: (model, mmproj)}) through the converter users run."""
    from models.checkpoint.convert import convert_to_gguf
    from models.checkpoint.gguf_format import chat_template
    from models.checkpoint.sat_format import write_sat_checkpoint
    from utils.language import get_template
    from utils.vision import CLIP_MEAN, CLIP_STD

    config = bench_config(config_name)
    sat_dir = os.path.join(work_dir, "sat")
    write_sat_checkpoint(sat_dir, config, [random_state_dict(config)])
    template = get_template("chat")
    return {outtype: convert_to_gguf(sat_dir, os.path.join(work_dir, f"cogvlm-{outtype}.gguf"), outtype,
                                     image_mean=CLIP_MEAN, image_std=CLIP_STD, tokenizer_dir=TOKENIZER_DIR,
                                     chat_template=chat_template(template.query, template.turn))
            for outtype in outtypes}


def write_prompt(work_dir: str, config, seed: int = 0) -> None:
    """One image prompt for both sides: [bos] + image block + TEXT_TOKENS random tokens in CogVLM's layout
    (bench/generate.py's), and the image as uint8 pixels of the ViT's size (nothing to resize)."""
    import torch
    from bench.generate import prompt_batch

    torch.manual_seed(seed)
    args = argparse.Namespace(image_length=config.image_length, vocab_size=config.vocab_size,
                              eva_args={"image_size": [config.vision.image_size] * 2})
    batch, _ = prompt_batch(None, args, 1, TEXT_TOKENS)
    size = config.vision.image_size
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    torch.save({"batch": batch, "pixels": torch.from_numpy(pixels)}, os.path.join(work_dir, PROMPT_FILE))


def read_prompt(work_dir: str):
    """(our batch with its `images`, the pixels, the text tokens after the image block, bos)."""
    import torch
    from utils.vision import get_image_processor

    saved = torch.load(os.path.join(work_dir, PROMPT_FILE), weights_only=True)
    batch, pixels = saved["batch"], saved["pixels"].numpy()
    batch["images"] = get_image_processor(pixels.shape[0]).normalize(pixels)[None]
    ids = batch["input_ids"][0].tolist()
    return batch, pixels, ids[-TEXT_TOKENS:], ids[0]


# Timed rows, each in its own process ------------------------------------------------------------------------

def kv_bytes(config, element_bytes: int, length: int) -> int:
    """Bytes of a KV cache holding `length` positions."""
    return 2 * config.num_layers * config.hidden_size * element_bytes * length


def time_ours(work_dir: str, precision: str, new_tokens: int, repeats: int) -> Tuple[List[Tuple[float, float]], int]:
    """[(prefill s, decode tok/s)] of our model loaded as the front ends load it, and the bytes a decode step
    reads (language-expert weights and LM head, the KV cache at its mean length)."""
    import torch
    from bench.generate import weight_bytes
    from models.checkpoint import load_model
    from models.kv_cache import cache_dtype
    from models.kernels.quantization import has_low_bit_weights
    from utils.generation import generate_batch_stream
    from utils.generation_config import GenerationConfig

    (dtype, quant), _ = PRECISIONS[precision]
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model, _ = load_model(os.path.join(work_dir, "sat"), dtype=torch_dtype, quant=quant or None, pack=not quant)
    batch, *_ = read_prompt(work_dir)
    config = GenerationConfig(max_length=batch["input_ids"].shape[1] + new_tokens, top_k=1, end_token_ids=[])

    def run():
        stream = generate_batch_stream(model, batch, config)
        start = time.perf_counter()
        next(stream)  # prefill (ViT included) + first token
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        steps = sum(1 for _ in stream)
        return prefill, steps / (time.perf_counter() - start)

    run()  # warm-up at the timed shapes
    runs = [run() for _ in range(repeats)]
    param = next(model.parameters())
    cache = cache_dtype(param.dtype, param.device, has_low_bit_weights(model)).itemsize
    mean_length = batch["input_ids"].shape[1] + new_tokens // 2
    return runs, weight_bytes(model, decode_only=True) + kv_bytes(model.config, cache, mean_length)


def time_llamacpp(work_dir: str, precision: str, new_tokens: int, repeats: int, threads: int, amx: bool = False
                  ) -> Tuple[List[Tuple[float, float]], int]:
    """[(prefill s, decode tok/s)] of llama.cpp on the same prompt, with its default settings (amx: see below),
    and the bytes a decode step reads (as `time_ours`; its KV cache is F16)."""
    import gguf
    from models.checkpoint import open_checkpoint
    from models.checkpoint.gguf_format import mmproj_path_for

    _, outtype = PRECISIONS[precision]
    model_path = os.path.join(work_dir, f"cogvlm-{outtype}.gguf")
    batch, pixels, text_tokens, bos = read_prompt(work_dir)
    # quantized weights without the repacked layouts: with them ggml's AMX product crashes on the prompt here
    # (LlamaCpp's docstring); "llama.cpp-amx" keeps them and feeds the prompt one row per micro-batch
    quantized = outtype.startswith("q")
    runtime = LlamaCpp(model_path, mmproj_path_for(model_path), threads=threads, exact=False,
                       context=batch["input_ids"].shape[1] + new_tokens, extra_buffers=amx or not quantized,
                       ubatch=1 if amx else None)

    def run():
        runtime.reset()
        start = time.perf_counter()
        logits, position = runtime.image_prompt(pixels, text_tokens, bos, all_logits=False)
        token = int(np.argmax(logits[-1]))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            token = int(np.argmax(runtime.decode([position + step], [token])[0]))
        return prefill, (new_tokens - 1) / (time.perf_counter() - start)

    run()
    try:
        runs = [run() for _ in range(repeats)]
    finally:
        runtime.close()
    weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(model_path).tensors
                  if t.name != "token_embd.weight" and ".vis_" not in t.name)
    config = open_checkpoint(os.path.join(work_dir, "sat")).config
    return runs, weights + kv_bytes(config, 2, batch["input_ids"].shape[1] + new_tokens // 2)


def child(options) -> None:
    import torch
    from bench.generate import proc_status_bytes

    torch.set_num_threads(options.threads)
    path, precision = options.child
    if path == "ours":
        runs, step_bytes = time_ours(options.dir, precision, options.new_tokens, options.repeats)
    else:
        runs, step_bytes = time_llamacpp(options.dir, precision, options.new_tokens, options.repeats, options.threads,
                                         amx=path == "llama.cpp-amx")
    print(json.dumps({"runs": runs, "step_bytes": step_bytes, "peak_rss_bytes": proc_status_bytes("VmHWM"),
                      "load_average": os.getloadavg()[0]}))


def others_running() -> int:
    """Runnable tasks on the machine besides this process, the most seen in 5 samples over 2 s (/proc/loadavg)."""
    most = 0
    for _ in range(5):
        with open("/proc/loadavg") as f:
            most = max(most, int(f.read().split()[3].split("/")[0]) - 1)
        time.sleep(0.4)
    return most


def wait_for_quiet(patience_s: float) -> int:
    """Wait (at most patience_s) until no other task runs; returns how many ran when the wait ended."""
    deadline = time.monotonic() + patience_s
    while (busy := others_running()) and time.monotonic() < deadline:
        time.sleep(3)
    return busy


def run_child(options, path: str, precision: str) -> Optional[dict]:
    command = [sys.executable, os.path.abspath(__file__), "--child", path, precision, "--dir", options.dir,
               "--new_tokens", str(options.new_tokens), "--repeats", str(options.repeats),
               "--threads", str(options.threads)]
    busy = wait_for_quiet(options.quiet_wait) if options.quiet_wait else others_running()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS=str(options.threads)))
    if out.returncode != 0:
        print(f"{path} {precision} failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), others_at_start=busy)


def bench(options) -> None:
    outtypes = [PRECISIONS[p][1] for p in options.precisions]
    if all(os.path.isfile(os.path.join(options.dir, f"cogvlm-{t}.gguf")) for t in outtypes) and \
            os.path.isdir(os.path.join(options.dir, "sat")):
        print(f"reusing the checkpoint and GGUF files in {options.dir}", flush=True)
    else:
        write_bench_model(options.dir, options.config, outtypes)
    write_prompt(options.dir, bench_config(options.config))
    rows = [(path, precision) for precision in options.precisions for path in ("ours", "llama.cpp")]
    if options.amx_decode:
        rows += [("llama.cpp-amx", p) for p in options.precisions if PRECISIONS[p][1].startswith("q")]
    found = {row: [] for row in rows}
    for round_index in range(options.rounds):  # a slow spell of this VM touches every row alike
        for row in rows:
            result = run_child(options, *row)
            if result is not None:
                found[row].append(result)
                runs = ", ".join(f"prefill {p:.3f} s, {t:.1f} tok/s" for p, t in result["runs"])
                print(f"  {row[1]} {row[0]}: {runs} (other tasks running at its start: "
                      f"{result['others_at_start']}, load after {result['load_average']:.1f})", flush=True)
        print(f"round {round_index + 1} of {options.rounds} done", flush=True)
    print(f"config {options.config}; {options.threads} threads; image prompt of {TEXT_TOKENS} text tokens, "
          f"{options.new_tokens} new tokens, greedy; median of {options.rounds} rounds x {options.repeats} run(s), "
          "each row in a fresh process per round (tok/s range in brackets); MB/step = bytes a decode step reads "
          "(language weights + LM head + KV cache at its mean length), GB/s = that x tok/s; load = the largest "
          "1-minute load average seen after a row")
    print(f"{'precision':9} {'path':13} {'weights':7} {'prefill s':>9} {'tok/s':>7} {'(range)':>15} {'MB/step':>7} "
          f"{'GB/s':>5} {'RSS GB':>6} {'load':>5}")
    medians = {}
    for (path, precision), results in found.items():
        if not results:
            continue
        runs = [run for result in results for run in result["runs"]]
        prefill = statistics.median(r[0] for r in runs)
        speed = statistics.median(r[1] for r in runs)
        medians[path, precision] = prefill, speed
        weights = PRECISIONS[precision][1].upper() if path.startswith("llama.cpp") else precision
        spread = f"({min(r[1] for r in runs):.1f}-{max(r[1] for r in runs):.1f})"
        step = results[0]["step_bytes"]
        print(f"{precision:9} {path:13} {weights:7} {prefill:9.3f} {speed:7.1f} {spread:>15} {step / 1e6:7.0f} "
              f"{step * speed / 1e9:5.1f} {max(r['peak_rss_bytes'] for r in results) / 1e9:6.2f} "
              f"{max(r['load_average'] for r in results):5.1f}")
    amx = [p for p in options.precisions if ("ours", p) in medians and ("llama.cpp-amx", p) in medians]
    if amx:
        print("ours/llama.cpp-amx decode (its prompt fed one row at a time): " + " ".join(
            f"{p} {medians['ours', p][1] / medians['llama.cpp-amx', p][1]:.2f}x" for p in amx))
    complete = [p for p in options.precisions if ("ours", p) in medians and ("llama.cpp", p) in medians]
    print("ours/llama.cpp prefill time: " + " ".join(
        f"{p} {medians['ours', p][0] / medians['llama.cpp', p][0]:.2f}x" for p in complete) + " (below 1: ours faster)")
    print("ours/llama.cpp decode: " + " ".join(
        f"{p} {medians['ours', p][1] / medians['llama.cpp', p][1]:.2f}x" for p in complete))


# llama.cpp as an oracle on the bench model (f32 export) -------------------------------------------------------

def check(options, new_tokens: int = 32) -> None:
    """llama.cpp on the f32 export against our fp32 model: a text prompt (same layout on both sides), and the
    image prompt in llama.cpp's layout (ours given the same positions and expert mask); then how far llama.cpp's
    layout is from CogVLM's (ours in both layouts)."""
    import torch
    from models.checkpoint import load_model

    exports = write_bench_model(options.dir, options.config, ["f32"])
    config = bench_config(options.config)
    write_prompt(options.dir, config)
    batch, pixels, text_tokens, bos = read_prompt(options.dir)
    torch.set_num_threads(options.threads)
    model, _ = load_model(os.path.join(options.dir, "sat"))
    runtime = LlamaCpp(*exports["f32"], threads=options.threads, context=batch["input_ids"].shape[1] + new_tokens)

    text = [bos] + np.random.default_rng(1).integers(3, config.vocab_size, 40).tolist()
    zeros = torch.zeros(1, len(text), dtype=torch.long)
    ours_tokens, ours_logits = ours_greedy(model, dict(input_ids=torch.tensor([text]), image_embed_mask=zeros,
                                                       vision_expert_mask=zeros,
                                                       position_ids=torch.arange(len(text))[None]), new_tokens)
    logits = runtime.decode(list(range(len(text))), text)
    tokens, steps = runtime.greedy(logits[-1], len(text), new_tokens)
    print(f"text prompt ({len(text)} tokens): greedy tokens equal {tokens == ours_tokens} ({new_tokens}); logits "
          f"max|diff|/max|ours| prompt {relative_error(logits, ours_logits[:len(text)]):.2e}, "
          f"steps {relative_error(steps, ours_logits[len(text) - 1:]):.2e}")

    eva = model.get_mixin("eva")
    with torch.no_grad():
        ours_embeddings = eva.linear_proj(eva.vit_model(batch["images"])[0])[0].numpy()
    their_embeddings = runtime.image_embeddings(pixels)
    print(f"image embeddings (libmtmd vs ours): {relative_error(their_embeddings[1:-1], ours_embeddings):.2e}")
    prompt = {key: batch[key] for key in ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask",
                                          "images")}
    start = prompt["input_ids"].shape[1] - len(text_tokens)
    ours_tokens, ours_logits = ours_greedy(model, llamacpp_layout(prompt), new_tokens)
    ours_steps = ours_logits[start + len(text_tokens) - 1:]
    image_block = np.concatenate([their_embeddings[:1], ours_embeddings, their_embeddings[-1:]])
    prefills = (("our image embeddings", lambda: runtime.embedded_image_prompt(image_block, text_tokens, bos)),
                ("libmtmd on the pixels", lambda: runtime.image_prompt(pixels, text_tokens, bos)))
    for name, prefill in prefills:
        runtime.reset()
        logits, position = prefill()
        tokens, _ = runtime.greedy(logits[-1], position, new_tokens)
        runtime.reset()
        prefill()
        forced = runtime.teacher_forced(logits[-1], position, ours_tokens)
        print(f"image prompt in llama.cpp's layout, {name}: greedy tokens "
              f"{first_divergence(tokens, ours_tokens, ours_steps, forced)}; logits prompt text "
              f"{relative_error(logits, ours_logits[start:start + len(text_tokens)]):.2e}, steps (on our tokens) "
              f"{relative_error(forced, ours_steps):.2e}")
    reference_tokens, reference_logits = ours_greedy(model, prompt, new_tokens)
    agree = sum(a == b for a, b in zip(ours_tokens, reference_tokens))
    print(f"llama.cpp's layout against CogVLM's (ours in each): {agree} of {new_tokens} greedy tokens agree; "
          "prompt-text logits differ by "
          f"{relative_error(ours_logits[start:position], reference_logits[start:position]):.2e} of their range")
    runtime.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="M", choices=("M", "tiny"))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="times every row runs, each in a fresh process")
    parser.add_argument("--amx_decode", action="store_true",
                        help="also time llama.cpp's Q8_0 / Q4_0 decode with its AMX layouts (prompt fed one row per "
                             "micro-batch: its multi-row AMX product crashes on this CPU)")
    parser.add_argument("--quiet_wait", type=float, default=0,
                        help="seconds each row may wait for no other task to run on the machine before it starts "
                             "(a shared machine: llama.cpp's spinning thread barriers slow down far more than torch "
                             "when a core is taken)")
    parser.add_argument("--check", action="store_true", help="compare llama.cpp's f32 export with ours instead")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after); "
                                                     "its checkpoint and GGUF files are reused by the next run")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options)
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as scratch:
        options.dir = options.dir or scratch
        check(options) if options.check else bench(options)


if __name__ == "__main__":
    main()
