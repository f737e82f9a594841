"""Chat data: read, render the chat template, mask, truncate, pack, cache, load. One concern per module:

- `read.py`: local .json/.jsonl/.parquet files and hub datasets -> conversations, with line-precise errors
- `formats.py`: the layouts (`messages`, `sharegpt`, `alpaca`) as a registry, and the bad-example policy
- `chat.py`: chat template -> token ids and the assistant-only labels; the truncation policy
- `pack.py`: best-fit packing, `collate` (position_ids that restart per conversation) and `left_pad`
- `cache.py`: tokenize once, into a verified Arrow cache keyed by everything that can change the ids
- `loader.py`: the resumable sampler and loader, and packed rows read on demand
- `module.py`: `ChatDataModule`, which ties them together for Lightning
- `inspection.py`: `describe` and `render_trained`, for `python -m phi3lit data`

Which positions are trained is defined once, in `phi3lit.data.labels` (`IGNORE_INDEX`, `loss_index`).
"""

from phi3lit.data.cache import cache_key, conversations_digest, tokenizer_fingerprint
from phi3lit.data.chat import Tokenized, encode_chat, prompt_of, reference_of, tokenize_chat, tokenize_example
from phi3lit.data.formats import BAD_KINDS, LAYOUTS, ROLES, check_messages, check_policy, detect_format, to_messages
from phi3lit.data.inspection import describe, render_trained
from phi3lit.data.labels import IGNORE_INDEX, loss_index
from phi3lit.data.loader import PackedRows, ResumableLoader, ResumableSampler
from phi3lit.data.module import ChatDataModule
from phi3lit.data.pack import collate, left_pad, pack_rows
from phi3lit.data.read import Conversations, load_conversations, read_conversations
from phi3lit.errors import BadExample, DataError

__all__ = [
    "BAD_KINDS", "IGNORE_INDEX", "LAYOUTS", "ROLES", "BadExample", "ChatDataModule", "Conversations", "DataError",
    "PackedRows", "ResumableLoader", "ResumableSampler", "Tokenized", "cache_key", "check_messages", "check_policy",
    "collate", "conversations_digest", "describe", "detect_format", "encode_chat", "left_pad", "load_conversations",
    "loss_index", "pack_rows", "prompt_of", "read_conversations", "reference_of", "render_trained", "to_messages",
    "tokenize_chat", "tokenize_example", "tokenizer_fingerprint",
]  # fmt: skip
