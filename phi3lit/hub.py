"""Which model folder a name means: a hub id, a local folder, or a built-in tiny model; and phi3lit's cache.

`model.pretrained` (and `--base`, `--model` of the exports and tools) takes three kinds of names: a Hugging Face hub
id (`microsoft/Phi-3-mini-4k-instruct`, downloaded by transformers on first use), a local folder in the
`save_pretrained` layout, or `builtin:tiny-phi3[-<shape>]`, a toy-size Phi-3 that phi3lit builds offline on first
use (`phi3lit.tiny`; the default one is pretrained on the lab's world, a few minutes once per machine) and
keeps under the cache root. Everything that loads a model passes its name through
`resolve_pretrained` first, so the three kinds take the same `from_pretrained` path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from phi3lit.tiny import TINY_NAME, TINY_SHAPES, TINY_TOKENIZER, build_tiny_model, pretrain, world

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
    # builtin:tiny-phi3 is the lab's pretrained base; the other shapes stay random-init (structure tests).
    steps = pretrain.STEPS if shape == "mini-4k" else 0
    # The folder name carries a hash of the recipe (shape, tokenizer, and for the pretrained base the world's and
    # the loop's code), so a changed recipe never reuses a stale build.
    recipe = json.dumps(TINY_SHAPES[shape], sort_keys=True) + (TINY_TOKENIZER / "tokenizer.json").read_text()
    if steps:
        recipe += f"{steps}" + Path(world.__file__).read_text() + Path(pretrain.__file__).read_text()
    prefix = "tiny-phi3" if shape == "mini-4k" else f"tiny-phi3-{shape}"
    path = cache_root() / f"{prefix}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # One builder per machine: the pretrained base takes minutes, and parallel test workers or DDP ranks that
        # ask at once wait for the first instead of each pretraining a copy.
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "config.json").exists():
                if steps:
                    print(f"[phi3lit] building {name} (pretraining on the lab's world, once per machine) in {path}",
                          file=sys.stderr, flush=True)  # fmt: skip
                build_tiny_model(path, shape=shape, pretrain_steps=steps)
    return str(path)
