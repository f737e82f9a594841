"""Which model folder a name means: a hub id, a local folder, or a built-in tiny model; and phi3lit's cache.

`model.pretrained` (and `--base`, `--model` of the exports and tools) takes three kinds of names: a Hugging Face hub
id (`microsoft/Phi-3-mini-4k-instruct`, downloaded by transformers on first use), a local folder in the
`save_pretrained` layout, or `builtin:tiny-phi3[-<shape>]`, a toy-size Phi-3 that phi3lit builds offline on first
use (`phi3lit.tiny`) and keeps under the cache root. Everything that loads a model passes its name through
`resolve_pretrained` first, so the three kinds take the same `from_pretrained` path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from phi3lit.tiny import TINY_NAME, TINY_SHAPES, TINY_TOKENIZER, build_tiny_model

BUILTIN_PREFIX = "builtin:"


def cache_root() -> Path:
    """phi3lit's cache (built-in models, tokenized data, compile caches): `$PHI3LIT_CACHE` or ~/.cache/phi3lit."""
    return Path(os.environ.get("PHI3LIT_CACHE", Path.home() / ".cache" / "phi3lit"))


def resolve_pretrained(name: str) -> str:
    """Map `builtin:tiny-phi3` (and `builtin:tiny-phi3-<shape>`, one per TINY_SHAPES key) to its cache folder,
    built on demand; pass hub ids and paths through."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    shape = "mini-4k" if name == TINY_NAME else name.removeprefix(TINY_NAME + "-")
    if shape not in TINY_SHAPES or name == f"{TINY_NAME}-mini-4k":
        known = ", ".join([TINY_NAME, *(f"{TINY_NAME}-{s}" for s in TINY_SHAPES if s != "mini-4k")])
        raise ValueError(f"unknown built-in model {name!r}; the built-in ones are {known}")
    # The folder name carries a hash of the recipe, so a changed shape or tokenizer never reuses a stale build.
    recipe = json.dumps(TINY_SHAPES[shape], sort_keys=True) + (TINY_TOKENIZER / "tokenizer.json").read_text()
    prefix = "tiny-phi3" if shape == "mini-4k" else f"tiny-phi3-{shape}"
    path = cache_root() / f"{prefix}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if not (path / "config.json").exists():
        build_tiny_model(path, shape=shape)
    return str(path)
