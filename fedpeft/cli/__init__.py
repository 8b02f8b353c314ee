"""Shared pieces of the command-line tools: console output, start-time checks, config composition."""
