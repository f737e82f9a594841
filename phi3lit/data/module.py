"""`ChatDataModule`: the data side of a run, from files to packed, resumable batches.

`setup` reads the files (`read.py`), holds out the validation split, tokenizes through the cache (`cache.py`) and
packs rows (`pack.py`); the loaders (`loader.py`) keep the training position in checkpoints. Checkpoints also keep a
fingerprint of the data, the split and the order settings (`state_dict`); resuming `fit` with different ones is
refused with the list of differences unless `accept_changes` is set.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from phi3lit.data.cache import conversations_digest, tokenize_cached
from phi3lit.data.chat import DROPPED, KEPT, NO_REPLY, TOO_LONG, TRUNCATED, prompt_of, reference_of, tokenize_chat
from phi3lit.data.formats import BAD_KINDS, LAYOUTS
from phi3lit.data.loader import PackedRows, ResumableLoader, ResumableSampler, ScoredOnceSampler
from phi3lit.data.pack import collate, left_pad, pack_rows
from phi3lit.data.read import Conversations, read_conversations
from phi3lit.errors import CheckpointError, ConfigError, DataError, missing_model
from phi3lit.hub import cache_root, resolve_pretrained
from phi3lit.savedrun import data_fingerprint_settings

# Settings that decide which conversations train and validate, and in what order, kept in checkpoints to compare
# on resume: the data ones of phi3lit.savedrun.RUN_DEFINING, less where the data is read from (digested instead).
_FINGERPRINT_SETTINGS = data_fingerprint_settings()


def _data_digest(conversations: Sequence) -> str:
    return f"{len(conversations)} conversations, sha256 {conversations_digest(conversations)[:16]}"


class ChatDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        test_file: str | None = None,
        predict_file: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        tokenizer: str = "",
        max_length: int = 1024,
        train_on: Literal["assistant", "all"] = "assistant",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        format: str = "auto",
        hub_config: str | None = None,
        on_bad_example: Literal["error", "skip"] = "error",
        truncation: Literal["truncate", "drop"] = "truncate",
        cache_dir: str | None = None,
    ):
        """
        Args:
            train_file: .json/.jsonl/.parquet file, or a hub dataset name, of chat examples (see `format`).
            val_file: separate validation data; if None, `val_fraction` of `train_file` is held out.
            val_fraction: share of the training conversations held out for validation when no `val_file`.
            test_file: data for `python -m phi3lit test`.
            predict_file: conversations to answer with `python -m phi3lit predict`; trailing assistant turns are
                dropped and the model writes the next reply.
            split: split to read from a hub dataset.
            val_split: split of `val_file` when it is a hub dataset (default: `split`).
            tokenizer: tokenizer folder or hub id. Linked to `model.pretrained` by the CLI.
            max_length: tokens per packed row; longer conversations follow `truncation`. Linked to the model.
            train_on: `assistant` trains on replies and their `<|end|>`; `all` on every token (model card).
            batch_size: packed rows per micro-batch.
            val_batch_size: packed rows per validation and test batch (None: `batch_size`). `limit_val_batches: N`
                scores the first N x val_batch_size rows of the seeded order, so runs that differ in `batch_size`
                score the same rows when they share this (`ablate` sets it for a `data.batch_size` axis).
            num_workers: DataLoader worker processes (collation is cheap; measured in experiments/bench).
            pin_memory: page-locked batches, so the copy to a GPU runs asynchronously; None: on when training
                on CUDA, off on CPU, where it would only cost a copy.
            seed: seed of the train/validation split and of the per-epoch row order.
            format: layout of every data file: `messages` ({"messages": [{role, content}]}), `sharegpt`
                ({"conversations": [{from, value}], "system"}), `alpaca` ({instruction, input, output} or
                {prompt, completion}), any other name in `phi3lit.data.formats.LAYOUTS`, or `auto` to tell from
                each file's first example.
            hub_config: configuration (subset) name of hub datasets, e.g. `en` of a multilingual dataset.
            on_bad_example: an example with an unknown role, an empty assistant reply or turns that do not
                alternate user/assistant: `error` stops with its file and line; `skip` skips and counts it.
            truncation: conversations longer than `max_length`: `truncate` keeps the start, cut after the last
                whole reply that fits (or inside the first reply if none fits); `drop` leaves them out.
            cache_dir: where tokenized datasets are cached (default: `tokenized/` in phi3lit's cache,
                `~/.cache/phi3lit` or `$PHI3LIT_CACHE`). A rerun with the same data, tokenizer and settings
                reads the cache instead of tokenizing again.
        """
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {max_length}")
        for name, value, allowed in (  # the CLI checks these Literals; direct Python callers get the same message
            ("train_on", train_on, ("assistant", "all")),
            ("format", format, ("auto", *LAYOUTS)),
            ("on_bad_example", on_bad_example, ("error", "skip")),
            ("truncation", truncation, ("truncate", "drop")),
        ):
            if value not in allowed:
                raise ConfigError(f"data.{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole resolved config instead
        self.tokenizer = None
        self.rows: dict[str, Sequence] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.tokenized: dict = {}  # split -> tokenized `datasets.Dataset`, one row per example, for `describe`
        self._train_loader: ResumableLoader | None = None  # the latest, for `state_dict`
        self._position: dict | None = None  # a checkpoint's training position, until the train loader exists
        self._fingerprint: dict | None = None  # the data, split and order settings of `fit`, kept in checkpoints
        # Resume even if the checkpoint's fingerprint differs (the CLI's --accept_changes sets it).
        self.accept_changes = False

    def load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.hparams.tokenizer))
            except OSError as e:
                raise missing_model(self.hparams.tokenizer, e) from None
            if self.hparams.train_on == "assistant":
                missing = [t for t in ("<|assistant|>", "<|end|>", "<|user|>") if t not in self.tokenizer.get_vocab()]
                if missing or not self.tokenizer.chat_template:
                    raise ConfigError(
                        f"data.train_on=assistant needs a tokenizer with Phi-3's chat tokens and chat template; "
                        f"{self.hparams.tokenizer!r} lacks {', '.join(missing) or 'a chat template'}. Use a Phi-3 "
                        "tokenizer, or data.train_on=all"
                    )
        return self.tokenizer

    def _read(self, source: str, split: str) -> Conversations:
        hp = self.hparams
        return read_conversations(source, split, hp.format, hp.hub_config, hp.on_bad_example)

    def _tokenize(
        self, conversations: list, name: str, bad: Conversations | None = None, locations: list[str] | None = None
    ) -> PackedRows:
        """Tokenize (or load from the cache) with HF datasets, drop what cannot be trained, pack into rows.

        `bad` carries the examples skipped while reading, which count against this split.
        """
        tok, hp = self.load_tokenizer(), self.hparams
        settings = {"max_length": hp.max_length, "train_on": hp.train_on, "truncation": hp.truncation}
        cache = Path(hp.cache_dir) if hp.cache_dir else cache_root() / "tokenized"
        ds, tokenized_now = tokenize_cached(conversations, tok, settings, cache, name)
        self.tokenized[name] = ds
        outcomes = list(ds["outcome"])
        lengths, trained = list(ds["length"]), list(ds["trained"])
        kept = [i for i, o in enumerate(outcomes) if o in (KEPT, TRUNCATED)]
        order = None
        if name in ("val", "test"):
            # Best-fit decreasing would put the longest conversations in the first rows, which are all that a
            # `limit_val_batches` scores (evaluation is never shuffled). Placing them in a seeded random order,
            # fixed for the run, makes any first rows a fair sample, and the same one at every validation.
            order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        packed = pack_rows([lengths[i] for i in kept], hp.max_length, order)
        rows = PackedRows(ds, [[kept[j] for j in row] for row in packed], locations)

        counts = Counter(outcomes)
        loaded = bad.skipped if bad else {}
        skipped = {f"skipped_{k}": loaded.get(k, 0) for k in BAD_KINDS}
        skipped |= {"skipped_no_reply": counts[NO_REPLY], "skipped_too_long": counts[TOO_LONG]}
        real = sum(lengths[i] for i in kept)
        stats = {
            "examples": len(outcomes) + sum(loaded.values()),
            "conversations": len(kept),
            "truncated": counts[TRUNCATED],
            "dropped": counts[DROPPED],
            "skipped": sum(skipped.values()),
            **skipped,
            "rows": len(rows),
            "real_tokens": real,
            "trained_tokens": sum(trained[i] for i in kept),
            "slots": len(rows) * hp.max_length,
            "tokenized": tokenized_now,
        }
        self.stats[name] = stats
        rank_zero_info(self._summary(name, stats))
        for kind, message in (bad.first_skip if bad else {}).items():
            rank_zero_info(f"[phi3lit] {name}: skipped {loaded[kind]} example(s) ({kind}); the first: {message}")
        return rows

    def _summary(self, name: str, s: dict[str, int]) -> str:
        slots = max(1, s["slots"])
        why = ", ".join(f"{k[len('skipped_') :]} {v}" for k, v in s.items() if k.startswith("skipped_") and v)
        return (
            f"[phi3lit] {name}: {s['examples']} examples -> {s['conversations']} conversations "
            f"({s['truncated']} truncated); skipped {s['skipped']}{f' ({why})' if why else ''}, dropped "
            f"{s['dropped']} (over {self.hparams.max_length} tokens) -> {s['rows']} packed rows, "
            f"{s['real_tokens'] / slots:.1%} real / {s['trained_tokens'] / slots:.1%} trained tokens per slot; "
            + (f"tokenized {s['tokenized']} now" if s["tokenized"] else "token ids read from the cache")
        )

    def _nothing_to_train(self, s: dict[str, int], held_out: int) -> str:
        hp = self.hparams
        why = ", ".join(f"{k[len('skipped_') :]} {v}" for k, v in s.items() if k.startswith("skipped_") and v)
        total = s["examples"] + held_out
        return (
            f"{hp.train_file}: nothing to train on: {total} examples, {held_out} held out for validation, "
            f"{s['skipped']} skipped{f' ({why})' if why else ''}, {s['dropped']} dropped (over data.max_length="
            f"{hp.max_length} tokens) -> 0 packed training rows. Check data.max_length, data.truncation (truncate "
            "keeps the start of long conversations), data.on_bad_example, data.val_fraction, and that examples "
            "have assistant replies"
        )

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate") and "train" not in self.rows:
            read = self._read(hp.train_file, hp.split)
            train, train_at, val_bad = read.conversations, read.locations, None
            if hp.val_file:
                val_bad = self._read(hp.val_file, hp.val_split or hp.split)
                val, val_at = val_bad.conversations, val_bad.locations
            else:
                g = torch.Generator().manual_seed(hp.seed)
                perm = torch.randperm(len(train), generator=g).tolist()
                n_val = max(1, round(hp.val_fraction * len(train))) if hp.val_fraction > 0 else 0
                val, val_at = [train[i] for i in perm[:n_val]], [train_at[i] for i in perm[:n_val]]
                keep = sorted(perm[n_val:])
                train, train_at = [train[i] for i in keep], [train_at[i] for i in keep]
            self._fingerprint = {
                **{k: hp[k] for k in _FINGERPRINT_SETTINGS},
                "train_data": _data_digest(train),
                "val_data": _data_digest(val),
            }
            # Examples skipped while reading a file that is then split count against the training split.
            self.rows["train"] = self._tokenize(train, "train", read, train_at)
            self.rows["val"] = self._tokenize(val, "val", val_bad, val_at) if val else []
            if stage == "fit" and self.trainer is not None and not self.rows["train"]:
                # Lightning would skip an empty epoch, save an untrained adapter and exit 0.
                held_out = 0 if hp.val_file else len(val)
                raise DataError(self._nothing_to_train(self.stats["train"], held_out))
        if stage == "test" and "test" not in self.rows:
            if not hp.test_file:
                raise DataError("data.test_file is not set; `test` needs a test file")
            read = self._read(hp.test_file, hp.split)
            self.rows["test"] = self._tokenize(read.conversations, "test", read, read.locations)

        if stage == "predict" and "predict" not in self.rows:
            if not hp.predict_file:
                raise DataError("data.predict_file is not set; `predict` needs prompts")
            conversations = self._read(hp.predict_file, hp.split).conversations
            self.rows["predict"] = [(prompt_of(c), reference_of(c)) for c in conversations]

    def _pin_memory(self) -> bool:
        if self.hparams.pin_memory is not None:
            return self.hparams.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        # Order depends only on (seed, epoch): Lightning calls set_epoch, restores the epoch on resume and
        # keeps a DistributedSampler under DDP, where each rank reads a disjoint shard.
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if name in ("val", "test"):  # each row scored once, however many ranks share the set
            sampler = ScoredOnceSampler(self.rows[name], num_replicas=replicas, rank=rank)
        else:
            sampler = ResumableSampler(
                self.rows[name],
                num_replicas=replicas,
                rank=rank,
                shuffle=shuffle,
                seed=self.hparams.seed,
                drop_last=False,
            )
        loader = ResumableLoader(
            self.rows[name],
            batch_size=self._batch_size(name),
            sampler=sampler,
            # Pad with <unk> (id 0 in Phi-3), never eos; padding is masked by position anyway.
            collate_fn=functools.partial(collate, pad_id=self.tokenizer.unk_token_id or 0),
            num_workers=self.hparams.num_workers,
            pin_memory=self._pin_memory(),
            generator=torch.Generator().manual_seed(self.hparams.seed),  # keep the global RNG untouched
        )
        loader.trainer = trainer
        if name in ("val", "test"):
            self._log_limited(name, sampler)
        return loader

    def _batch_size(self, name: str) -> int:
        if name in ("val", "test") and self.hparams.val_batch_size:
            return self.hparams.val_batch_size
        return self.hparams.batch_size

    def _log_limited(self, name: str, sampler: ScoredOnceSampler) -> None:
        """Say exactly what a `limit_val_batches` / `limit_test_batches` below the whole split scores."""
        key = f"limit_{name}_batches"
        limit = getattr(self.trainer, key, None)
        rows, bs = self.rows[name], self._batch_size(name)
        batches = math.ceil(sampler.num_samples / bs)  # per rank; drop_last is off
        if limit is None or batches == 0:
            return
        # Lightning's reading of the limit: an int caps the batches per rank, a float is a share of them.
        scored = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if scored >= batches:
            return
        seen = set()
        for rank in range(sampler.num_replicas):  # rank r reads rows r, r + W, ... of the (fixed) order
            seen.update(sampler.scored_rows(rank, scored, bs))
        convs = sum(len(rows.index[i]) for i in seen)
        total = sum(len(r) for r in rows.index)
        rank_zero_info(
            f"[phi3lit] {name}: {key}={limit} scores {len(seen)} of {len(rows)} packed rows (a seeded random subset"
            f"{', the same at every validation' if name == 'val' else ''}): {convs} of {total} conversations"
        )

    def train_dataloader(self):
        loader = self._loader("train", shuffle=True)
        if self._position is not None:  # before Lightning takes the loader's length: see ResumableLoader.__len__
            loader.load_state_dict(self._position)
            epoch, done = loader.sampler.resume
            if epoch == self.trainer.current_epoch:  # the sampler continues this epoch's order where it stopped
                rank_zero_info(
                    f"[phi3lit] train: resuming epoch {epoch} after {min(done, len(self.rows['train']))} of its "
                    f"{len(self.rows['train'])} packed rows; the rest in batches of {self.hparams.batch_size} on "
                    f"{loader.sampler.num_replicas} device(s)"
                )
            else:  # Lightning's loop state says epoch `epoch` finished: the sampler starts the next one
                rank_zero_info(
                    f"[phi3lit] train: the checkpoint counts epoch {epoch} as finished after {done} of its "
                    f"{len(self.rows['train'])} packed rows (written after the training loop, by an earlier "
                    f"phi3lit); training continues with epoch {self.trainer.current_epoch} from its first row"
                )
            self._position = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """Saved in checkpoints by Lightning: the training position (as the loader's own state, which Lightning also
        saves but restores only after it has taken the loader's length) and the fingerprint of the data, the split
        and the order settings."""
        state = {}
        if self._train_loader is not None:
            state["train_position"] = self._train_loader.state_dict()
        if self._fingerprint is not None:
            state["fingerprint"] = dict(self._fingerprint)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning on resume, after `setup` and before `train_dataloader`.

        Resuming `fit` on other data, another split or order (a different fingerprint) raises `CheckpointError`
        listing each difference, unless `accept_changes` is set. `batch_size` and the number of devices may change.
        """
        fitting = self.trainer is not None and getattr(self.trainer.state, "fn", None) == "fit"
        saved = state.get("fingerprint")
        if fitting and saved and self._fingerprint and not self.accept_changes:
            changed = [
                f"data.{k}: checkpoint {saved.get(k)!r}, now {v!r}"
                for k, v in self._fingerprint.items()
                if k in saved and saved[k] != v
            ]
            if changed:
                raise CheckpointError(
                    "the checkpoint was trained on other data or data settings, so resuming would not continue "
                    f"its data order: {'; '.join(changed)}. Pass --accept_changes true to resume anyway"
                )
        self._position = state.get("train_position")

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if self.rows.get("val") else []

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        tok = self.load_tokenizer()

        def collate_prompts(rows):  # left padding, so every reply starts right after its prompt
            prompts, references = zip(*rows, strict=True)
            ids = [tokenize_chat(p, tok, add_generation_prompt=True)["input_ids"] for p in prompts]
            input_ids, attention_mask = left_pad(ids, tok.unk_token_id or 0)
            return {
                "input_ids": input_ids, "attention_mask": attention_mask, "messages": list(prompts),
                "references": list(references),
            }  # fmt: skip

        return DataLoader(self.rows["predict"], batch_size=self.hparams.batch_size, collate_fn=collate_prompts)
