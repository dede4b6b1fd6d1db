"""The inference layer (processor, conversation, generation, chat) and the finetuning data of CogVLM."""
import models  # noqa: F401  (sets the environment SAT reads, before any module here imports SAT)
