"""ΔW = scale · B · A of LoRA updates: its size, spectrum and directions, from tensors, a live model or an adapter.

The quantities of the LoRA paper's analysis (Hu et al. 2021, §7), for one update (a whole module, or one slice of
a fused projection for slice targets such as [q, v]):

- ‖ΔW‖_F, the singular values of ΔW (its spectrum) and its stable rank ‖ΔW‖_F² / ‖ΔW‖_2², from a thin SVD that
  never forms ΔW (`lowrank_svd`: QR of B and Aᵀ, then the SVD of an r x r matrix);
- the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F, where U, V are the left and right singular vectors of ΔW (its r
  directions) and W the base weight: how much ΔW amplifies directions that W itself barely uses. Beside it,
  ‖Uᵀ W V‖_F for random orthonormal U, V of the same size (the paper's "random" column) (`update_metrics`);
- the normalised subspace similarity between two adapters' A matrices (`subspace_similarity`, `phi`),

      φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖_F² / min(i, j)   ∈ [0, 1],

  where U₁ⁱ are the top-i right-singular vectors of A₁ (LoRA's r × in matrix). 1 means the top-i directions of
  one lie in the top-j of the other, 0 that they are orthogonal; two random subspaces of dimensions i and j in d
  dimensions give about max(i, j) / d.

The norms logged during training are `phi3lit.model.norms`. `load_updates` reads a saved peft
adapter into `Update`s (per slice where the adapter is sliced), and `BaseWeights` reads the base weights W one
tensor at a time. This module imports only torch at load time; safetensors, peft and the hub are imported where
they are used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from phi3lit.errors import ConfigError
from phi3lit.model.norms import LAYER

ADAPTER_PREFIX = "base_model.model."  # peft's prefix before the base model's own parameter names


# ---------------------------------------------------------------------------- the mathematics
def lowrank_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0):
    """The thin SVD of ΔW = scale · B · A (B: out x r, A: r x in) without forming ΔW: U (out x k), S (k), V (in x k).

    With B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = Q_B (scale R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small middle matrix gives
    ΔW's: O((out + in) r²) instead of O(out · in · r). Computed in float64.
    """
    b, a = b.detach().double().cpu(), a.detach().double().cpu()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    um, s, vmh = torch.linalg.svd(scale * rb @ ra.T, full_matrices=False)
    return qb @ um, s, qa @ vmh.T


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A (r x in), as columns (in x r), by decreasing singular value."""
    _, _, vh = torch.linalg.svd(a.detach().double().cpu(), full_matrices=False)
    return vh.T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(A₁, A₂, i, j) for every i ≤ r₁, j ≤ r₂, as an r₁ x r₂ matrix (entry [i-1, j-1]).

    ‖U₁ⁱᵀ U₂ʲ‖_F² is the sum of the squared entries of the top-left i x j block of G = U₁ᵀ U₂, so one matrix
    product and a 2-d cumulative sum give all of them.
    """
    g = right_singular_vectors(a1).T @ right_singular_vectors(a2)
    overlap = (g**2).cumsum(0).cumsum(1)
    i = torch.arange(1, g.shape[0] + 1, dtype=g.dtype)[:, None]
    j = torch.arange(1, g.shape[1] + 1, dtype=g.dtype)[None, :]
    return overlap / torch.minimum(i, j)


def phi(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """The normalised subspace similarity φ(A₁, A₂, i, j) of Hu et al. 2021, §7 (equation 4)."""
    return float(subspace_similarity(a1, a2)[i - 1, j - 1])


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def update_metrics(b: torch.Tensor, a: torch.Tensor, scale: float, w: torch.Tensor | None, seed: int = 0) -> dict:
    """‖ΔW‖_F, spectrum, stable rank and (given the base weight W) the §7 amplification of ΔW = scale · B · A."""
    u, s, v = lowrank_svd(b, a, scale)
    fro = float(torch.linalg.vector_norm(s))
    out = {"dW_fro": fro, "spectrum": s.tolist(), "sigma_1": float(s[0]) if len(s) else 0.0}
    out["stable_rank"] = fro**2 / float(s[0]) ** 2 if fro > 0 else 0.0
    out |= {"W_fro": None, "dW_rel": None, "UtWV_fro": None, "amplification": None, "UtWV_fro_random": None}
    if w is None:
        return out
    w = w.detach().double().cpu()
    w_fro = float(torch.linalg.matrix_norm(w))
    keep = s > s[0] * 1e-10 if fro > 0 else torch.zeros_like(s, dtype=torch.bool)
    out["W_fro"], out["dW_rel"] = w_fro, fro / w_fro if w_fro else None
    k = int(keep.sum())
    if k:
        uwv = float(torch.linalg.matrix_norm(u[:, keep].T @ w @ v[:, keep]))
        out["UtWV_fro"] = uwv
        out["amplification"] = fro / uwv if uwv else math.inf
        gen = torch.Generator().manual_seed(seed)
        ur, vr = random_orthonormal(w.shape[0], k, gen), random_orthonormal(w.shape[1], k, gen)
        out["UtWV_fro_random"] = float(torch.linalg.matrix_norm(ur.T @ w @ vr))
    return out


# ---------------------------------------------------------------------------- adapters and base weights
@dataclass
class Update:
    """One low-rank update: a whole module, or one slice of a fused projection (its rows of W, its r columns)."""

    layer: int | None
    kind: str  # q, k, v, gate, up for slices; qkv_proj, o_proj, gate_up_proj, down_proj, lm_head, ... for modules
    weight_key: str  # the base weight in the model's state dict
    scale: float
    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r (the slice's rows only)
    rows: tuple[int, int] | None = None  # rows of the fused weight, for slices
    transpose: bool = False  # embeddings: peft stores A as r x vocab, and ΔW = (B A)ᵀ; a and b are swapped here
    metrics: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def key(self) -> tuple:
        return (-1 if self.layer is None else self.layer, self.kind)


def damaged() -> tuple[type[Exception], ...]:
    """What a damaged adapter file raises while its tensors are read and used (truncated, garbage, odd shapes)."""
    from safetensors import SafetensorError

    return (SafetensorError, RuntimeError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError)


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def check_scales(cfg: dict, path: Path) -> None:
    """r and lora_alpha (and their per-module patterns) must be positive numbers: the update scale comes from them."""
    values = {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha")}
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise ConfigError(f"analyze: {path}: {key} must map module names to numbers, got {pattern!r}")
        values |= {f"{key}[{k!r}]": v for k, v in pattern.items()}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"analyze: {path}: {key} must be a positive number, got {v!r}; is the adapter damaged?")


def load_updates(
    adapter_dir: Path, targets: list[str] | None = None, model_config=None, adapter_config: dict | None = None
) -> tuple[list[Update], dict]:
    """The updates of a peft adapter folder, and its adapter_config (read here unless given, as read_adapter_config
    returns it).

    Slice targets are split per slice: from `targets` (the run's `model.lora.targets`) when given, else from the
    adapter itself (a fused module whose B is zero outside some slices' rows, in blocks of columns); slices need
    `model_config` (the base's config, for the rows of each slice).
    """
    from safetensors.torch import load_file

    from phi3lit.export.clients import lora_pairs, peft_scale
    from phi3lit.model.adapter import read_adapter_config
    from phi3lit.model.lora import FUSED, resolve_targets, slice_rows

    cfg = adapter_config if adapter_config is not None else read_adapter_config(str(adapter_dir), "analyze:")
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    plan = resolve_targets(targets) if targets else None
    updates = []
    for prefix, (a, b) in sorted(lora_pairs(tensors).items()):
        kind = prefix.rsplit(".", 1)[-1]
        layer = LAYER.search(prefix + ".")
        layer = int(layer.group(1)) if layer else None
        weight_key = prefix.removeprefix(ADAPTER_PREFIX) + ".weight"
        scale = peft_scale(cfg, prefix)
        a, b = a.float(), b.float()
        if f"{prefix}.lora_embedding_A" in tensors:  # ΔW (vocab x dim) = (B A)ᵀ = Aᵀ Bᵀ
            updates.append(Update(layer, kind, weight_key, scale, a=b.T, b=a.T, transpose=True))
            continue
        if kind in FUSED and model_config is not None:
            rows = slice_rows(model_config, kind)
            enabled = plan.get(kind) if plan is not None else detect_slices(b, rows, FUSED[kind])
            if enabled:
                r = a.shape[0] // len(enabled)
                for j, s in enumerate(enabled):
                    lo, hi = rows[s]
                    cols = slice(j * r, (j + 1) * r)
                    updates.append(Update(layer, s, weight_key, scale, a[cols], b[lo:hi, cols], rows=(lo, hi)))
                continue
        updates.append(Update(layer, kind, weight_key, scale, a, b))
    return updates, cfg


def detect_slices(b: torch.Tensor, rows: dict[str, tuple[int, int]], order: tuple[str, ...]) -> tuple | None:
    """The enabled slices of a sliced fused module, read from B: k slices with non-zero rows, each non-zero only in
    its own block of R/k columns, in order. None for a whole module (or a B that is all zero: nothing to split)."""
    on = tuple(s for s in order if b[slice(*rows[s])].abs().sum() > 0)
    if not on or len(on) == len(order) or b.shape[1] % len(on):
        return None
    r = b.shape[1] // len(on)
    for j, s in enumerate(on):
        block = b[slice(*rows[s])].clone()
        block[:, j * r : (j + 1) * r] = 0
        if block.abs().sum() > 0:
            return None
    return on


class BaseWeights:
    """The base model's weights, read one tensor at a time from its safetensors files (a 7.6 GB base never needs
    to be in memory at once), and its config."""

    def __init__(self, name: str, override: str | None = None):
        from phi3lit.hub import resolve_pretrained

        source = override or name
        try:
            folder = Path(resolve_pretrained(source)).expanduser()
        except ValueError as e:
            raise ConfigError(f"analyze: base model {source!r}: {e}") from None
        if not folder.is_dir():
            folder = self._hub(source)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"analyze: base model {source!r}: no config.json in {folder}; pass --base DIR")
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    self.files |= dict.fromkeys(f.keys(), path)
        if not self.files:
            raise ConfigError(f"analyze: base model {source!r}: no *.safetensors weights in {folder}; pass --base DIR")

    @staticmethod
    def _hub(name: str) -> Path:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # not a hub id, no network, not cached
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise ConfigError(
                f"analyze: base model {name!r}: not a local folder and not loadable from the hub ({first}); "
                "pass --base DIR (a folder with config.json and *.safetensors)"
            ) from None

    def model_config(self) -> SimpleNamespace:
        return SimpleNamespace(**self.config)

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        if key not in self.files and key == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            key = "model.embed_tokens.weight"  # tied (Phi-4-mini): the output projection is the embedding matrix
        if key not in self.files:
            return None
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key)
