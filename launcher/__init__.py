"""lalo: run local llama.cpp models behind one OpenAI-compatible port."""

__version__ = "0.1.0"
