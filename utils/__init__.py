"""Processing, chat, grounding and conversion utilities for CogVLM."""
