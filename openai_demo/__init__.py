"""OpenAI-compatible API server for CogVLM (`openai_api.py`) and an example client."""
