"""Shared test infrastructure: a scriptable next-hop SMTP server and a daemon launcher."""
