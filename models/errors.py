"""User-facing errors: each carries a one-line message that names the problem and the fix.

Front ends (CLI, web demo, API, training scripts) catch `CogVLMError` and print its message
instead of a traceback.
"""


class CogVLMError(Exception):
    """Base class of every error caused by user input (files, flags, requests)."""


class CheckpointError(CogVLMError):
    """A checkpoint that cannot be found or does not match the model."""


class TokenizerError(CogVLMError):
    """A tokenizer that cannot be loaded."""


class ImageError(CogVLMError):
    """An image path or URL that cannot be read as an image."""


class PromptError(CogVLMError):
    """A prompt that does not fit, or an unknown prompt template."""


class ConfigError(CheckpointError):
    """A model config (model_config.json / config.json) that is malformed or is not CogVLM's."""


class SamplingError(CogVLMError):
    """A decoding setting out of range; `param` names it (the API answers 400 with it)."""

    def __init__(self, message: str, param: str = None):
        super().__init__(message)
        self.param = param
