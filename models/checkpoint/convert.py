"""Checkpoint conversions: SAT <-> HF (`cogvlm-chat-hf`), SAT model-parallel resharding (merge N -> 1 with
LoRA folded, or split 1 -> N), and SAT or HF -> GGUF for llama.cpp (models.checkpoint.gguf_format). SAT <-> HF
is lossless: tensors keep their dtype and bits unless a dtype is asked for.

Memory: tensors stream one at a time from memory-mapped SAT files or per-tensor safetensors reads; a SAT
output holds one shard's state dict (torch.save writes a whole dict), an HF output one safetensors shard.
Config and weights are checked against each other before anything is written; outputs appear atomically.
"""
import contextlib
import logging
import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from models.checkpoint import gguf_format
from models.checkpoint.atomic import PARTIAL_MARKER, check_new_output_dir, is_disk_full
from models.checkpoint.directory import Checkpoint, open_checkpoint
from models.checkpoint.hf_format import DEFAULT_MAX_SHARD_BYTES, write_hf_checkpoint
from models.checkpoint.layout import LORA_MARKERS, PTUNING_PREFIX, ROTARY_KEY, check_divisible, summarise, tensor_table
from models.checkpoint.sat_format import write_sat_checkpoint
from models.errors import CheckpointError
from models.templates import TEMPLATE_NAMES

logger = logging.getLogger(__name__)


def parse_size(text) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '123' -> 123 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise CheckpointError(f"cannot read the size '{text}'; write it like 5GB, 500MB or 2GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def _opened(source: Union[str, Checkpoint]) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else open_checkpoint(source)


def _refuse_finetuning_state(keys, source: str, target: str = "the HF layout") -> None:
    """The HF layout (and GGUF) has no place for unmerged LoRA or P-tuning prefixes."""
    lora = [k for k in keys if any(m in k for m in LORA_MARKERS)]
    if lora:
        raise CheckpointError(f"{source} holds unmerged LoRA weights ({summarise(lora, 2)}); merge them into the base "
                              "weights first (merge_model.py) and convert the merged checkpoint")
    ptuning = [k for k in keys if k.startswith(PTUNING_PREFIX)]
    if ptuning:
        raise CheckpointError(f"{source} holds P-tuning prefixes ({summarise(ptuning, 2)}), which {target} "
                              "cannot hold; finetune with LoRA (and merge it) to export it")


def convert_sat_to_hf(source: Union[str, Checkpoint], out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      template: Optional[str] = None, extra_files=None) -> List[str]:
    """SAT checkpoint (any model-parallel size, LoRA merged) -> new HF-format directory. Returns the weight files.

    template: config.json's `template_version` (default: the checkpoint's, else chat). extra_files(dir): adds files
    (modeling code, tokenizer) before the output appears."""
    check_new_output_dir(out_dir)
    checkpoint = _opened(source)
    if checkpoint.format != "sat":
        raise CheckpointError(f"{checkpoint.path} is already in HF format")
    if template is not None and template not in TEMPLATE_NAMES:
        raise CheckpointError(f"unknown template version '{template}'; choose one of {', '.join(TEMPLATE_NAMES)}")
    reader = checkpoint.reader()
    _refuse_finetuning_state(reader.stored_keys, f"checkpoint {checkpoint.path}")
    reader.check_against_config()
    unknown = set(reader.stored_keys) - {spec.sat_key for spec in tensor_table(checkpoint.config)}
    if unknown:
        raise CheckpointError(f"checkpoint {checkpoint.path} holds tensors CogVLM does not have ({summarise(unknown)})")
    specs = tensor_table(checkpoint.config)
    dtypes = set()

    def hf_tensors():
        for spec in tqdm(specs, desc="SAT -> HF", unit="tensor"):
            tensor = reader.tensor(spec.sat_key)
            if spec.sat_key != ROTARY_KEY:  # the fixed fp32 rotary buffer does not say what the weights are
                dtypes.add(tensor.dtype)
            for hf_key in spec.hf_keys:
                yield hf_key, tensor

    def config_json():
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return checkpoint.config.to_hf_dict(dtype, template)

    files = write_hf_checkpoint(out_dir, config_json, hf_tensors(), max_shard_bytes, extra_files=extra_files)
    logger.info("wrote %s (%d weight file(s)) from %s", out_dir, len(files), checkpoint.path)
    return files


def convert_hf_to_sat(source: Union[str, Checkpoint], out_dir: str) -> str:
    """HF-format directory -> new SAT checkpoint (model-parallel size 1). Returns the written .pt file."""
    check_new_output_dir(out_dir)
    checkpoint = _opened(source)
    if checkpoint.format != "hf":
        raise CheckpointError(f"{checkpoint.path} is already in SAT format")
    reader = checkpoint.reader()
    state_dict = dict(tqdm(reader.items(), total=len(reader.stored_keys), desc="HF -> SAT", unit="tensor"))
    path = write_sat_checkpoint(out_dir, checkpoint.config.replace(model_parallel_size=1), [state_dict])[0]
    logger.info("wrote %s from %s", path, checkpoint.path)
    return path


def reshard_checkpoint(source: Union[str, Checkpoint], out_dir: str, model_parallel_size: int = 1,
                       dtype: Optional[torch.dtype] = None, template: Optional[str] = None) -> List[str]:
    """Write the SAT checkpoint `source` to `out_dir` split `model_parallel_size` ways (1: merged), with any LoRA
    folded into the base weights. dtype: cast floating-point tensors (None keeps them). template: the
    prompt template the output names as its default (None keeps the source's). Returns the files."""
    check_new_output_dir(out_dir)
    checkpoint = _opened(source)
    if checkpoint.format != "sat":
        raise CheckpointError(f"{checkpoint.path} is an HF-format checkpoint; convert it to SAT first "
                              "(scripts/convert_checkpoint.py) or load it directly")
    if model_parallel_size < 1:
        raise CheckpointError(f"model_parallel_size must be >= 1, got {model_parallel_size}")
    config = checkpoint.config
    check_divisible(config, model_parallel_size)
    reader = checkpoint.reader()
    reader.check_against_config()
    keys = reader.folded_keys()
    for key in keys:  # every tensor has a split rule, before anything is written
        if model_parallel_size != reader.mp_size:
            reader.split_of(key)
    out_config = config.replace(model_parallel_size=model_parallel_size)
    if template is not None:
        out_config = out_config.replace(template=template)
    if reader.has_lora:
        out_config = out_config.without_lora()

    def shards():
        for rank in range(model_parallel_size):
            yield {key: reader.tensor(key, rank, model_parallel_size)
                   for key in tqdm(keys, desc=f"rank {rank} of {model_parallel_size}", disable=len(keys) < 200)}

    return write_sat_checkpoint(out_dir, out_config, shards(), dtype=dtype)


# --outtype values made by llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), from a GGUF of
# the checkpoint's own float type; q4_k is llama.cpp's Q4_K_M mix. Their mmproj is written as Q8_0.
LLAMA_CPP_OUTTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GGUF_OUTTYPES = tuple(gguf_format.OUTTYPES) + tuple(LLAMA_CPP_OUTTYPES)
_LOSSLESS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_llama_log = None  # the log callback handed to llama.cpp (see _llama_cpp_quantize)


@contextlib.contextmanager
def _atomic_files(paths: Sequence[str]) -> Iterator[List[str]]:
    """Temporary names beside `paths`; on success each is renamed to its path, in order (so the last one
    appearing means all are complete), on failure all are removed."""
    for path in paths:
        if os.path.exists(path):
            raise CheckpointError(f"output file '{path}' exists; choose a new name or remove it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CheckpointError(f"cannot write '{path}': its directory does not exist")
    temps = [os.path.join(os.path.dirname(os.path.abspath(p)), f".{os.path.basename(p)}{PARTIAL_MARKER}{os.getpid()}")
             for p in paths]
    try:
        yield temps
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    except BaseException as error:
        for temp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
        # numpy's tofile (the gguf writer's) reports a short write without an errno
        short_write = isinstance(error, OSError) and re.search(r"\d+ requested and \d+ written", str(error))
        if is_disk_full(error) or short_write:
            raise CheckpointError(f"no space left while writing {' and '.join(paths)}; nothing was written: free "
                                  "disk space and run again") from None
        raise


def _llama_cpp_quantize(source: str, target: str, outtype: str) -> None:
    """llama.cpp's quantizer on the GGUF file `source`."""
    try:
        import llama_cpp  # optional: only these outtypes need it (requirements-dev.txt pins it)
    except ImportError:
        raise CheckpointError(f"--outtype {outtype} uses llama.cpp's quantizer: pip install llama-cpp-python==0.3.36 "
                              f"(or choose one of {', '.join(gguf_format.OUTTYPES)})") from None
    global _llama_log
    if _llama_log is None:  # kept for the process's life: llama.cpp holds the pointer
        @llama_cpp.llama_log_callback
        def _llama_log(level, text, user_data):
            if level in (3, 4):  # ggml_log_level WARN and ERROR (INFO lists every tensor)
                logger.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())
    llama_cpp.llama_log_set(_llama_log, None)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_OUTTYPES[outtype])
    logger.info("quantizing to %s with llama.cpp", outtype)
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise CheckpointError(f"llama.cpp's quantizer failed on {source} (outtype {outtype})")


def convert_to_gguf(source: Union[str, Checkpoint], out_path: str, outtype: str = "f32", *,
                    image_mean: Sequence[float], image_std: Sequence[float], tokenizer_dir: Optional[str] = None,
                    chat_template: Optional[str] = None) -> Tuple[str, str]:
    """SAT or HF checkpoint -> llama.cpp's CogVLM: the language model GGUF `out_path` (with the tokenizer of
    `tokenizer_dir`, default the checkpoint's own, and `chat_template` if given) and the mmproj GGUF beside it
    (gguf_format.mmproj_path_for). image_mean / image_std: the ViT's pixel normalisation. Returns both paths.

    outtype: f32 / f16 / bf16 / q8_0 (matrices in that type, written here), or q4_0 / q4_k (llama.cpp's
    quantizer on a lossless GGUF; their mmproj is Q8_0). Both files appear together or not at all.
    """
    if outtype not in GGUF_OUTTYPES:
        raise CheckpointError(f"unknown --outtype '{outtype}'; choose one of {', '.join(GGUF_OUTTYPES)}")
    if not out_path.endswith(".gguf"):
        raise CheckpointError(f"'{out_path}' does not end in .gguf; name the GGUF output like model.gguf")
    checkpoint = _opened(source)
    reader = checkpoint.reader()
    _refuse_finetuning_state(reader.stored_keys, f"checkpoint {checkpoint.path}", "a GGUF file")
    reader.check_against_config()
    tokenizer_dir = tokenizer_dir or checkpoint.tokenizer_dir
    if tokenizer_dir is None:
        raise CheckpointError(f"checkpoint {checkpoint.path} carries no tokenizer; a GGUF file needs one: pass "
                              "--tokenizer DIR (a folder with tokenizer.model)")
    vocabulary = gguf_format.read_vocabulary(tokenizer_dir, checkpoint.config.vocab_size)
    config, name = checkpoint.config, checkpoint.name
    mmproj_path = gguf_format.mmproj_path_for(out_path)
    quantizer = outtype in LLAMA_CPP_OUTTYPES
    with _atomic_files([mmproj_path, out_path]) as (mmproj_temp, model_temp):
        vision_type = gguf_format.OUTTYPES["q8_0" if quantizer else outtype]
        gguf_format.write_mmproj(mmproj_temp, config, reader.tensor, vision_type, image_mean, image_std, name)
        if quantizer:
            lossless = _LOSSLESS.get(reader.tensor("transformer.word_embeddings.weight").dtype, "f32")
            float_temp = model_temp + ".float"
            try:
                gguf_format.write_language_model(float_temp, config, reader.tensor, gguf_format.OUTTYPES[lossless],
                                                 vocabulary, name, chat_template)
                _llama_cpp_quantize(float_temp, model_temp, outtype)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(float_temp)
        else:
            gguf_format.write_language_model(model_temp, config, reader.tensor, gguf_format.OUTTYPES[outtype],
                                             vocabulary, name, chat_template)
    logger.info("wrote %s and %s (%s) from %s", out_path, mmproj_path, outtype, checkpoint.path)
    return out_path, mmproj_path
