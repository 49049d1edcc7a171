"""filterd: an asyncio SMTP content filter (version lives here, nothing else)."""

__version__ = "0.1.0"
