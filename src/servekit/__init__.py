"""servekit: turn bare GPU servers into verified vLLM endpoints."""

__version__ = "0.1.0"
