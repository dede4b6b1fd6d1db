"""The inference layer (processor, conversation, generation, chat) and the finetuning data of CogVLM."""
from models import sat_compat  # noqa: F401  (must precede the first `import sat`)
