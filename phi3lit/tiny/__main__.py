"""Maintainers only: `python -m phi3lit.tiny` regenerates the shipped tokenizer, chats and demo task rows."""

from jsonargparse import CLI

from phi3lit.tiny import DEMO_TASK_DATA, TINY_DATA, TINY_TOKENIZER, WORLD_DIR, write_assets

CLI(write_assets, prog="python -m phi3lit.tiny")
print(f"wrote {TINY_DATA}, {WORLD_DIR}, {DEMO_TASK_DATA} and {TINY_TOKENIZER}")
