"""Shared pieces of the command-line tools: where output goes and what it says, stopping, one-line
errors, ``--help``, start-time checks, config composition."""
