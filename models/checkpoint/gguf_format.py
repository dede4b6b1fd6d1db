"""GGUF files for llama.cpp's CogVLM (arch `cogvlm`, projector `cogvlm`): the language model with its visual
expert, and the `mmproj` file with the ViT and the GLU adapter. Written with the `gguf` package.

Names and metadata keys are the `gguf` package's (`gguf.TENSOR_NAMES`, `GGUFWriter.add_*`); llama.cpp reads
them in src/models/cogvlm.cpp (LLM) and tools/mtmd/models/cogvlm.cpp (mmproj). Tensors keep our layout (a
GGUF shape is the torch shape reversed, so nothing is transposed; the fused q|k|v rows stay in order, since
llama.cpp's CogVLM applies NeoX-style rotary as we do), with two exceptions that follow from llama.cpp's
graphs rather than from any file format:
- the ViT appends the CLS token after the patches and adds position-embedding row j to token j, so the rows
  are written as [patch rows..., CLS row] (ours hold the CLS row first; in checkpoint order every patch
  would get its neighbour's position);
- llama.cpp's ViT MLP activation is quick GELU unless `clip.use_gelu` selects the tanh approximation;
  CogVLM's is the erf GELU, and tanh is the closer of the two (tests/test_gguf.py compares the image
  embeddings).
Tensors stream one at a time from the checkpoint reader (shapes come from the config, so the header is
written before any weight is read).
"""
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import gguf
import numpy as np
import sentencepiece
import torch
from tqdm import tqdm

from models.checkpoint.layout import ROTARY_KEY, tensor_table
from models.config import ROTARY_BASE, CogVLMConfig
from models.errors import CheckpointError

logger = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
# --outtype values our writer produces, and the GGML type of the matrices in each
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
TOKENIZER_FILE = "tokenizer.model"
MMPROJ_PREFIX = "mmproj-"  # llama.cpp's own name for the projector file next to a model
MEDIA_MARKER = "<__media__>"  # where llama.cpp's front ends (libmtmd) put an image in a prompt

_LLM_GLOBAL = {"transformer.word_embeddings.weight": (T.TOKEN_EMBD, ".weight"),
               "transformer.final_layernorm.weight": (T.OUTPUT_NORM, ".weight"),
               "mixins.lm.lm_head.weight": (T.OUTPUT, ".weight")}
_LLM_LAYER = {"transformer.layers.{i}.input_layernorm.weight": T.ATTN_NORM,
              "transformer.layers.{i}.post_attention_layernorm.weight": T.FFN_NORM,
              "transformer.layers.{i}.attention.query_key_value.weight": T.ATTN_QKV,
              "transformer.layers.{i}.attention.dense.weight": T.ATTN_OUT,
              "mixins.rotary.vision_query_key_value_list.{i}.weight": T.VISEXP_ATTN_QKV,
              "mixins.rotary.vision_dense_list.{i}.weight": T.VISEXP_ATTN_OUT,
              "transformer.layers.{i}.mlp.dense_h_to_4h.weight": T.FFN_UP,
              "mixins.mlp.gate_proj.{i}.weight": T.FFN_GATE,
              "transformer.layers.{i}.mlp.dense_4h_to_h.weight": T.FFN_DOWN,
              "mixins.mlp.vision_dense_h_to_4h_list.{i}.weight": T.VISEXP_UP,
              "mixins.mlp.vision_gate_proj.{i}.weight": T.VISEXP_GATE,
              "mixins.mlp.vision_dense_4h_to_h_list.{i}.weight": T.VISEXP_DOWN}
_VIT = "mixins.eva.vit_model."
_MMPROJ_GLOBAL = {_VIT + "mixins.patch_embedding.proj.weight": (T.V_ENC_EMBD_PATCH, ".weight"),
                  _VIT + "mixins.patch_embedding.proj.bias": (T.V_ENC_EMBD_PATCH, ".bias"),
                  _VIT + "transformer.word_embeddings.weight": (T.V_ENC_EMBD_CLS, ""),
                  _VIT + "transformer.position_embeddings.weight": (T.V_ENC_EMBD_POS, ".weight"),
                  "mixins.eva.linear_proj.linear_proj.weight": (T.V_MMPROJ_FC, ".weight"),
                  "mixins.eva.linear_proj.norm1.weight": (T.V_MM_POST_FC_NORM, ".weight"),
                  "mixins.eva.linear_proj.norm1.bias": (T.V_MM_POST_FC_NORM, ".bias"),
                  "mixins.eva.linear_proj.gate_proj.weight": (T.V_MM_GATE, ".weight"),
                  "mixins.eva.linear_proj.dense_h_to_4h.weight": (T.V_MM_UP, ".weight"),
                  "mixins.eva.linear_proj.dense_4h_to_h.weight": (T.V_MM_DOWN, ".weight"),
                  "mixins.eva.boi": (T.V_TOK_BOI, ""),
                  "mixins.eva.eoi": (T.V_TOK_EOI, "")}
_VIT_LAYER = {"transformer.layers.{i}.input_layernorm": T.V_ENC_INPUT_NORM,  # applied to the attention output
              "transformer.layers.{i}.post_attention_layernorm": T.V_ENC_POST_ATTN_NORM,  # to the MLP output
              "transformer.layers.{i}.attention.query_key_value": T.V_ENC_ATTN_QKV,
              "transformer.layers.{i}.attention.dense": T.V_ENC_ATTN_O,
              "transformer.layers.{i}.mlp.dense_h_to_4h": T.V_ENC_FFN_UP,
              "transformer.layers.{i}.mlp.dense_4h_to_h": T.V_ENC_FFN_DOWN}
# added to activations or convolved, not multiplied as matrices: kept in float whatever the outtype
_ADDED = (T.V_ENC_EMBD_CLS, T.V_ENC_EMBD_POS, T.V_TOK_BOI, T.V_TOK_EOI)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: our SAT key, its GGUF name, our (torch) shape and the GGML type written."""
    sat_key: str
    name: str
    shape: Tuple[int, ...]
    qtype: Q


def mmproj_path_for(model_path: str) -> str:
    """Where the mmproj file of the language-model GGUF `model_path` goes: `mmproj-<name>` beside it."""
    folder, name = os.path.split(model_path)
    return os.path.join(folder, MMPROJ_PREFIX + name)


def tensor_type(kind: T, name: str, shape: Sequence[int], outtype: Q) -> Q:
    """The GGML type a tensor is written in: matrices in `outtype`; vectors, biases and the tensors that are
    added (CLS, positions, boi/eoi) in F32; the patch convolution in F32 or F16 (llama.cpp's im2col takes
    only those); a Q8_0 matrix whose rows are not whole 32-value blocks falls back to F16."""
    if len(shape) < 2 or kind in _ADDED or name.endswith(".bias"):
        return Q.F32
    if kind == T.V_ENC_EMBD_PATCH:
        return Q.F32 if outtype == Q.F32 else Q.F16
    block = gguf.GGML_QUANT_SIZES[outtype][0]
    if shape[-1] % block:
        logger.info("%s: rows of %d values are not whole %s blocks; writing it as F16", name, shape[-1], outtype.name)
        return Q.F16
    return outtype


def _name(kind: T, suffix: str, i: Optional[int] = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=i) + suffix


def language_model_tensors(config: CogVLMConfig, outtype: Q) -> List[GGUFTensor]:
    """The language model GGUF's tensors (the rotary table is not stored: llama.cpp computes it)."""
    shapes = {spec.sat_key: spec.shape for spec in tensor_table(config)}
    entries = [(key, _name(kind, suffix), kind) for key, (kind, suffix) in _LLM_GLOBAL.items()]
    entries += [(key.format(i=i), _name(kind, ".weight", i), kind)
                for i in range(config.num_layers) for key, kind in _LLM_LAYER.items()]
    return [GGUFTensor(key, name, shapes[key], tensor_type(kind, name, shapes[key], outtype))
            for key, name, kind in entries]


def mmproj_tensors(config: CogVLMConfig, outtype: Q) -> List[GGUFTensor]:
    """The mmproj GGUF's tensors: ViT, GLU adapter, boi and eoi."""
    shapes = {spec.sat_key: spec.shape for spec in tensor_table(config)}
    entries = [(key, _name(kind, suffix), kind) for key, (kind, suffix) in _MMPROJ_GLOBAL.items()]
    for i in range(config.vision.num_layers):
        for key, kind in _VIT_LAYER.items():
            for part in ("weight", "bias"):
                entries.append((_VIT + key.format(i=i) + "." + part, _name(kind, "." + part, i), kind))
    return [GGUFTensor(key, name, shapes[key], tensor_type(kind, name, shapes[key], outtype))
            for key, name, kind in entries]


def _encoded(tensor: GGUFTensor, value: torch.Tensor) -> np.ndarray:
    """`value` in the layout and type the GGUF file holds."""
    array = value.detach().to(torch.float32).contiguous()
    if tensor.sat_key == _VIT + "transformer.position_embeddings.weight":
        array = torch.cat([array[1:], array[:1]])  # CLS row last (see the module docstring)
    return gguf.quants.quantize(array.numpy(), tensor.qtype)


def _nbytes(tensor: GGUFTensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[tensor.qtype]
    return math.prod(tensor.shape[:-1]) * tensor.shape[-1] // block * size


def _write(path: str, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None], tensors: Sequence[GGUFTensor],
           read: Callable[[str], torch.Tensor], what: str) -> None:
    """Write one GGUF file at `path`: metadata, tensor infos, then each tensor as it is read."""
    writer = gguf.GGUFWriter(path, arch)
    add_metadata(writer)
    for tensor in tensors:
        if tensor.qtype in (Q.F32, Q.F16):
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32 if tensor.qtype == Q.F32 else
                                                                       np.float16), _nbytes(tensor))
        else:  # blocks of bytes: the writer takes the byte shape
            writer.add_tensor_info(tensor.name, gguf.quants.quant_shape_to_byte_shape(tensor.shape, tensor.qtype),
                                   np.dtype(np.uint8), _nbytes(tensor), raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tqdm(tensors, desc=what, unit="tensor"):
        data = _encoded(tensor, read(tensor.sat_key))
        if data.nbytes != _nbytes(tensor):
            raise CheckpointError(f"{tensor.sat_key}: {data.nbytes} bytes encoded, {_nbytes(tensor)} expected")
        writer.write_tensor_data(data)
    writer.close()


@dataclass(frozen=True)
class Vocabulary:
    """A SentencePiece vocabulary as GGUF's `llama` tokenizer holds it."""
    tokens: List[str]
    scores: List[float]
    types: List[int]
    bos_id: int
    eos_id: int
    unk_id: int


def read_vocabulary(tokenizer_dir: str, vocab_size: int) -> Vocabulary:
    """The pieces, scores and types of `tokenizer_dir/tokenizer.model`, padded with unused pieces to the
    model's `vocab_size` (a model may have more embedding rows than its tokenizer has pieces)."""
    path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"'{tokenizer_dir}' has no {TOKENIZER_FILE}; a GGUF file carries the SentencePiece "
                              "tokenizer: pass a tokenizer directory that holds tokenizer.model")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is not a SentencePiece model ({str(e)[:200]})") from None
    size = processor.get_piece_size()
    if size > vocab_size:
        raise CheckpointError(f"{path} has {size} pieces but the model only {vocab_size} embedding rows; the "
                              "tokenizer does not belong to this checkpoint")
    tokens, scores, types = [], [], []
    for i in range(size):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if processor.is_unknown(i) else gguf.TokenType.CONTROL
                     if processor.is_control(i) else gguf.TokenType.BYTE if processor.is_byte(i)
                     else gguf.TokenType.UNUSED if processor.is_unused(i) else gguf.TokenType.NORMAL)
    for i in range(size, vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return Vocabulary(tokens, scores, [int(t) for t in types], processor.bos_id(), processor.eos_id(),
                      processor.unk_id())


def check_rotary(config: CogVLMConfig, inv_freq: torch.Tensor) -> None:
    """llama.cpp computes rotary frequencies from `rope.freq_base`: refuse a checkpoint whose table is not
    the standard one for that base."""
    expected = 1.0 / (ROTARY_BASE ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.float(), expected, rtol=1e-5):
        raise CheckpointError(f"{ROTARY_KEY} is not the rotary table of base {ROTARY_BASE}; llama.cpp cannot "
                              "reproduce it from rope.freq_base")


def write_language_model(path: str, config: CogVLMConfig, read: Callable[[str], torch.Tensor], outtype: Q,
                         vocabulary: Vocabulary, name: str, chat_template: Optional[str] = None) -> None:
    """The `cogvlm` GGUF: LLM + visual expert + tokenizer. read(sat_key) -> the full tensor."""
    check_rotary(config, read(ROTARY_KEY))

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[outtype])
        writer.add_context_length(config.max_sequence_length)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_layers)
        writer.add_feed_forward_length(config.inner_hidden_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_attention_heads)
        writer.add_layer_norm_rms_eps(config.layernorm_epsilon)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(float(ROTARY_BASE))
        writer.add_vocab_size(config.vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocabulary.tokens)
        writer.add_token_scores(vocabulary.scores)
        writer.add_token_types(vocabulary.types)
        writer.add_bos_token_id(vocabulary.bos_id)
        writer.add_eos_token_id(vocabulary.eos_id)
        writer.add_unk_token_id(vocabulary.unk_id)
        writer.add_pad_token_id(vocabulary.unk_id)  # Vicuna pads with <unk>
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chat_template:
            writer.add_chat_template(chat_template)

    _write(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.COGVLM], metadata, language_model_tensors(config, outtype),
           read, f"GGUF {os.path.basename(path)}")


def write_mmproj(path: str, config: CogVLMConfig, read: Callable[[str], torch.Tensor], outtype: Q,
                 image_mean: Sequence[float], image_std: Sequence[float], name: str) -> None:
    """The `clip` GGUF with projector type `cogvlm`: ViT + GLU adapter + boi/eoi. image_mean/std: the
    per-channel normalisation of [0, 1] pixels that the ViT was trained with."""
    vision = config.vision

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[outtype])
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(gguf.VisionProjectorType.COGVLM)
        writer.add_vision_projection_dim(config.hidden_size)
        writer.add_vision_image_size(vision.image_size)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_embedding_length(vision.hidden_size)
        writer.add_vision_feed_forward_length(vision.inner_hidden_size)
        writer.add_vision_block_count(vision.num_layers)
        writer.add_vision_head_count(vision.num_attention_heads)
        writer.add_vision_attention_layernorm_eps(vision.layernorm_epsilon)
        writer.add_vision_image_mean(list(image_mean))
        writer.add_vision_image_std(list(image_std))
        writer.add_vision_use_gelu(True)

    _write(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], metadata, mmproj_tensors(config, outtype), read,
           f"GGUF {os.path.basename(path)}")


def chat_template(query: str, turn: Optional[str] = None) -> str:
    """A Jinja chat template (GGUF `tokenizer.chat_template`, read by llama-mtmd-cli and llama-server) for a
    prompt template: `query` formats the last user message ({query}), `turn` (None: history is not shown) each
    earlier exchange ({query}, {response}). An image marker anywhere in the messages goes first, where CogVLM
    puts the image; llama.cpp adds bos itself."""
    def literal(text: str) -> str:
        return json.dumps(text)  # a double-quoted string literal both Jinja engines read

    query_head, query_tail = query.split("{query}")
    lines = ["{%- set ns = namespace(image=false, history='', query='') -%}",
             "{%- for message in messages -%}",
             "{%- set text = message['content'] if message['content'] is string else '' -%}",
             f"{{%- if {literal(MEDIA_MARKER)} in text -%}}{{%- set ns.image = true -%}}"
             f"{{%- set text = text | replace({literal(MEDIA_MARKER)}, '') -%}}{{%- endif -%}}",
             "{%- if message['role'] == 'user' -%}{%- set ns.query = text -%}"]
    if turn is not None:
        turn_head, rest = turn.split("{query}")
        turn_middle, turn_tail = rest.split("{response}")
        lines.append(f"{{%- elif message['role'] == 'assistant' -%}}{{%- set ns.history = ns.history + "
                     f"{literal(turn_head)} + ns.query + {literal(turn_middle)} + text + {literal(turn_tail)} -%}}")
    lines += ["{%- endif -%}", "{%- endfor -%}",
              f"{{%- if ns.image -%}}{{{{ {literal(MEDIA_MARKER)} }}}}{{%- endif -%}}",
              f"{{{{ ns.history + {literal(query_head)} + ns.query + {literal(query_tail)} }}}}"]
    return "\n".join(lines)


def gguf_tensors(path: str) -> Iterator[Tuple[str, Q, Tuple[int, ...]]]:
    """(name, GGML type, torch-order shape) of every tensor in the GGUF file at `path`."""
    for tensor in gguf.GGUFReader(path).tensors:
        yield tensor.name, Q(tensor.tensor_type), tuple(int(d) for d in reversed(tensor.shape))
