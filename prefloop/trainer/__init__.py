"""DPO training: pure losses, tokenisation of conversations, one LoRA DPO round.

Imports neither ``prefloop.app`` nor ``prefloop.serving``: a round runs as its own process
(``python -m prefloop.trainer``) on any TRL-format preference file.
"""
