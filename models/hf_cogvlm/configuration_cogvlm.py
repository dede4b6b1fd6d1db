"""CogVLM configuration for 🤗 transformers, in the field names of the published `cogvlm-*-hf` config.json.

This file is also copied into converted checkpoint directories as `trust_remote_code` code, so it
imports only the standard library and transformers.
"""
from typing import Optional

from transformers import PretrainedConfig

# The prompt templates for `template_version`, a copy of models.templates.TEMPLATES (the owner): this file
# travels alone in converted checkpoints, without the project; tests/test_one_source.py keeps the two equal.
# Each: (the new query, one earlier turn or None when history is not shown, the text the answer follows or None).
PROMPT_TEMPLATES = {
    "base": ("{query}", None, None),
    "chat": ("Question: {query} Answer:", "Question: {query} Answer: {response}\n", "Answer:"),
    "vqa": ("Question: {query} Short answer:", "Question: {query} Short answer: {response}\n", "Short answer:"),
}
TEMPLATE_VERSIONS = tuple(PROMPT_TEMPLATES)
DEFAULT_TEMPLATE = "chat"  # when a config.json names none (models.templates.DEFAULT_TEMPLATE)

# The EVA2-CLIP-E of the released 490 px models; a config.json's `vision_config` overrides these key by key.
DEFAULT_VISION_CONFIG = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1792,
    "image_size": 490,
    "in_channels": 3,
    "intermediate_size": 15360,
    "layer_norm_eps": 1e-6,
    "num_heads": 16,
    "num_hidden_layers": 63,
    "num_positions": 1226,
    "patch_size": 14,
}


class CogVLMConfig(PretrainedConfig):
    """LLaMA-style language model with a visual expert, plus an EVA2-CLIP ViT described by `vision_config`.

    `vision_config` stays a plain dict, as `cogvlm-chat-hf` writes it (`num_heads`, `num_positions`,
    `in_channels`, ...). `template_version` ("base", "chat" or "vqa") is the prompt template that
    `build_conversation_input_ids` uses when none is given.
    """

    model_type = "cogvlm"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = False
    template_version: str = DEFAULT_TEMPLATE
    vision_config: Optional[dict] = None

    def __post_init__(self, **kwargs):
        self.vision_config = {**DEFAULT_VISION_CONFIG, **(self.vision_config or {})}
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        """One clear line for a config that this architecture cannot run."""
        vision = self.vision_config
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                            f"{self.num_attention_heads}")
        if vision["hidden_size"] % vision["num_heads"]:
            problems.append(f"vision_config hidden_size {vision['hidden_size']} is not a multiple of num_heads "
                            f"{vision['num_heads']}")
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
        if vision["num_positions"] != patches + 1:
            problems.append(f"vision_config num_positions is {vision['num_positions']} but a {vision['image_size']} px "
                            f"image with patch {vision['patch_size']} needs {patches + 1} (patches + CLS)")
        for name, value, supported in (("hidden_act", self.hidden_act, "silu"),
                                       ("vision_config.hidden_act", vision["hidden_act"], "gelu"),
                                       ("tie_word_embeddings", self.tie_word_embeddings, False)):
            if value != supported:
                problems.append(f"{name}={value!r} is not CogVLM's architecture (expects {supported!r})")
        if self.template_version not in TEMPLATE_VERSIONS:
            problems.append(f"template_version {self.template_version!r} is not one of {', '.join(TEMPLATE_VERSIONS)}")
        if problems:
            raise ValueError("CogVLM config: " + "; ".join(problems))

    @property
    def num_image_patches(self) -> int:
        """Image tokens per image: (image_size / patch_size)^2 (boi and eoi come on top)."""
        return (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2


__all__ = ["CogVLMConfig"]
