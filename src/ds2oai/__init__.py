"""ds2oai: a streaming gateway from OpenAI-style HTTP+SSE clients to DeepSeek Chat Completions."""

__all__ = ["__version__"]

__version__ = "0.1.0"
