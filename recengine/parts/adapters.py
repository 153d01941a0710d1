"""A tuned encoder's weights as a file: the adapter (issue #15).

`recengine tune` (and each tuned part of a training) writes what tuning learnt as one safetensors
file: the LoRA adapters (`lora`), AdaLoRA's (`adalora`: each module's A, E and B, its pruned singular
values zero, so the file needs no rank pattern: the model built at the initial rank computes the same
output), every weight of the model (`full`), the head's projection (`head`, in fixed point, whole
multiples of 2^-16) or the warm items' offsets (`offset`, fixed point, their ids in the metadata: a
record of the tuning, not an encoder), with string metadata naming the base encoder
(its registered name, its parameters as JSON and its id), the mode, the LoRA rank and alpha, the
text field, `tuned_until` (the end of the tuning window: the encoder has seen events before it) and
a sha256 digest of the tensors. Never pickled; written atomically.

`load_adapter` reads one from a local path or an MLflow URI (`runs:/<id>/adapter.safetensors`,
`models:/...`, `mlflow-artifacts:/...`) and checks the digest. `AdaptedEncoder` is the base encoder
with the adapter applied: an encoder like any other (`create_encoder(name, {..., "adapter": URI})`),
whose id names the mode and the digest, so the embedding cache never mixes it with the base model
or another tuning, and whose `until` tells the parts using it which requests it may serve.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass
from dataclasses import field as _field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from recengine.core.files import atomic_write_bytes
from recengine.errors import ConfigError, DataError

FORMAT = "recengine-adapter-v1"
MODES = ("head", "lora", "adalora", "full", "offset")
SCALE = 2.0**16  # the head's fixed point (recengine.features.tuned.SCALE)
# Encoder parameters that choose where and how fast it runs, not what it computes: an adapter tuned on
# a GPU in bf16 applies to the same model on a CPU in fp32.
RUNTIME_PARAMS = ("device", "precision", "token_budget", "max_batch")
MLFLOW_SCHEMES = ("runs:", "models:", "mlflow-artifacts:")


@dataclass
class Adapter:
    """What an adapter file holds: the tensors and the base encoder's reference."""

    tensors: dict[str, np.ndarray]
    encoder: str
    encoder_params: dict[str, Any]
    mode: str
    until: datetime
    field: str = "title"
    base_id: str = ""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_modules: tuple[str, ...] = ("query", "value")
    extra: dict[str, str] = _field(default_factory=dict)  # anything else recorded (tuning settings, curves)

    @property
    def digest(self) -> str:
        return tensors_digest(self.tensors)


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 of the tensors in name order: each one's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_adapter(path: str | Path, adapter: Adapter) -> Path:
    """Write `adapter` to `path` as safetensors with its metadata, atomically (a temporary file in
    the same folder, renamed). Returns the path."""
    from safetensors.numpy import save

    if adapter.mode not in MODES:
        raise ConfigError(f"adapter mode {adapter.mode!r}: give one of {', '.join(MODES)}.")
    path = Path(path)
    tensors = {name: np.ascontiguousarray(value) for name, value in sorted(adapter.tensors.items())}
    params = {k: v for k, v in adapter.encoder_params.items() if k != "adapter"}
    metadata = {
        "format": FORMAT, "mode": adapter.mode, "encoder": adapter.encoder,
        "encoder_params": json.dumps(params, sort_keys=True), "base_id": adapter.base_id,
        "lora_rank": str(adapter.lora_rank), "lora_alpha": str(adapter.lora_alpha),
        "lora_modules": ",".join(adapter.lora_modules), "field": adapter.field,
        "tuned_until": _utc(adapter.until).isoformat(), "digest": tensors_digest(tensors),
        **{k: str(v) for k, v in adapter.extra.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def is_adapter_file(path: str | Path) -> bool:
    """Whether `path` is a file this module wrote (its header names the format); False for anything else."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > 100_000_000:
                return False
            header = json.loads(handle.read(size))
        return header.get("__metadata__", {}).get("format") == FORMAT
    except (OSError, ValueError, struct.error, AttributeError):
        return False


def check_adapter_destination(path: Path) -> None:
    """Refuse, before any tuning, a destination that writing an adapter would destroy: a folder, or an
    existing file that is not an adapter this module wrote (an adapter file is replaced)."""
    if path.is_dir() or (path.exists() and not is_adapter_file(path)):
        raise ConfigError(f"--output {path} exists and is {'a folder' if path.is_dir() else 'not an adapter file'}; "
                          "recengine tune replaces only adapter files it wrote. Give another path, e.g. "
                          "--output adapter.safetensors.")


def load_adapter(uri: str | Path) -> Adapter:
    """The adapter at a local path or an MLflow URI, its digest checked. Every problem (missing,
    damaged, altered) is a DataError naming `uri` and saying what to do."""
    return parse_adapter(adapter_bytes(uri), str(uri))


def adapter_bytes(uri: str | Path) -> bytes:
    """The adapter file at a local path or an MLflow URI, as bytes, unchecked (`load_adapter` checks)."""
    text = str(uri)
    if text.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory() as folder:
            return _download(text, folder).read_bytes()
    path = Path(text)
    if not path.is_file():
        raise DataError(f"adapter {text}: no such file. Give the path of an adapter file written by `recengine tune` "
                        "(--output), or its MLflow URI as the command printed it (runs:/RUN_ID/adapter.safetensors).")
    return path.read_bytes()


def _download(uri: str, folder: str) -> Path:
    import mlflow.artifacts

    from recengine.core.store import tracking_uri

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder, tracking_uri=tracking_uri()))
    except Exception as exc:  # MlflowException, OSError: a wrong run id or path, another store
        raise DataError(f"adapter {uri}: cannot download it from the MLflow store {tracking_uri()} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check the run id and "
                        "the file's path (`recengine tune` prints the URI), and that MLFLOW_TRACKING_URI names the "
                        "store the tuning was logged in.") from None
    if local.is_dir():  # a URI naming the run's folder: the adapter inside it
        found = sorted(local.rglob("*.safetensors"))
        if len(found) != 1:
            raise DataError(f"adapter {uri} is a folder holding {len(found)} .safetensors files; give the URI of one "
                            f"adapter file (e.g. {uri.rstrip('/')}/adapter.safetensors).")
        local = found[0]
    return local


def parse_adapter(data: bytes, source: str) -> Adapter:
    from safetensors.numpy import load

    damaged = (f"adapter {source} is damaged or not an adapter file ({{}}). Write it again with `recengine tune`, "
               "or give the URI of the copy logged in MLflow.")
    try:
        size = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8 : 8 + size])["__metadata__"]
        tensors = load(data)
    except Exception as exc:  # safetensors' own error, a bad header, a truncated file
        raise DataError(damaged.format(f"{type(exc).__name__}: {exc}")) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(damaged.format(f"its metadata does not name the format {FORMAT}"))
    if tensors_digest(tensors) != meta.get("digest"):
        raise DataError(f"adapter {source}: its tensors do not match the digest recorded in it "
                        f"({str(meta.get('digest'))[:16]}...): the file was altered or damaged. Write it again with "
                        "`recengine tune`, or give the URI of the copy logged in MLflow.")
    _check_finite(tensors, source)
    known = {"format", "mode", "encoder", "encoder_params", "base_id", "lora_rank", "lora_alpha", "lora_modules",
             "field", "tuned_until", "digest"}
    try:
        return Adapter(tensors=tensors, encoder=meta["encoder"], encoder_params=json.loads(meta["encoder_params"]),
                       mode=meta["mode"], until=naive_utc(datetime.fromisoformat(meta["tuned_until"])),
                       field=meta.get("field", ""), base_id=meta.get("base_id", ""),
                       lora_rank=int(meta.get("lora_rank", 8)), lora_alpha=int(meta.get("lora_alpha", 16)),
                       lora_modules=tuple(m for m in meta.get("lora_modules", "query,value").split(",") if m),
                       extra={k: v for k, v in meta.items() if k not in known})
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(damaged.format(f"metadata {type(exc).__name__}: {exc}")) from None


def _check_finite(tensors: dict[str, np.ndarray], source: str) -> None:
    """A NaN or infinite weight makes every embedding NaN: refuse it here (the digest cannot tell, since it
    was computed over the same values), not after a catalogue has been encoded to nothing."""
    bad = sorted(name for name, value in tensors.items() if value.dtype.kind in "fc" and not np.isfinite(value).all())
    if bad:
        raise DataError(f"adapter {source}: tensor {bad[0]!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} "
                        "holds NaN or infinite values (the tuning diverged, or the file was altered). Tune again with "
                        "`recengine tune` (a lower --param lr), or give another adapter.")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def naive_utc(moment: datetime) -> datetime:
    # Event times are naive UTC (polars Datetime("ms")): `until` compares with them as one.
    return _utc(moment).replace(tzinfo=None)


@dataclass(frozen=True)
class AdaloraSchedule:
    """AdaLoRA's rank schedule, in shares of the run's optimiser steps (peft wants step counts, which
    depend on the pairs and the batch size): every module starts at `init_rank`; after the first `warmup`
    share the budget shrinks, every `interval` steps, towards an average of the target rank; the last
    `final` share trains at the allocated ranks. `orth_weight`: the orthogonality penalty on the
    singular vectors (peft adds it only to a model output's own loss, so the tuning adds it here)."""

    init_rank: int = 12
    warmup: float = 0.1
    final: float = 0.2
    interval: int = 1
    orth_weight: float = 0.5

    def steps(self, total: int) -> tuple[int, int]:
        """(tinit, tfinal) for `total` steps, leaving at least one step of budgeting, as peft requires."""
        tinit, tfinal = int(self.warmup * total), int(self.final * total)
        while tinit + tfinal >= total and (tinit or tfinal):
            tinit, tfinal = (tinit - 1, tfinal) if tinit >= tfinal else (tinit, tfinal - 1)
        return tinit, tfinal


def lora_model(encoder, rank: int = 8, alpha: int = 16, modules: tuple[str, ...] = ("query", "value"), full: bool = False,
               adalora: AdaloraSchedule | None = None, total_steps: int = 1):
    """A copy of the encoder's model with fresh LoRA adapters, (`adalora`) AdaLoRA ones scheduled over
    `total_steps`, or (`full`) with every weight trainable; the encoder's own model is untouched."""
    import copy

    base = copy.deepcopy(encoder._load()).float()
    if full:
        for parameter in base.parameters():
            parameter.requires_grad_(True)
        return base
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if adalora is None:
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0))
    else:
        tinit, tfinal = adalora.steps(total_steps)
        model = get_peft_model(base, AdaLoraConfig(
            init_r=adalora.init_rank, target_r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0,
            total_step=max(total_steps, 1), tinit=tinit, tfinal=tfinal, deltaT=adalora.interval,
            orth_reg_weight=adalora.orth_weight))
    # Only the adapters train. peft moves AdaLoRA's `ranknum` to a CUDA base layer's device by storing a plain
    # tensor in a ParameterDict, which makes it a trainable Parameter there (not on the CPU): the optimiser
    # would then move the adapters' scaling, and the state would carry it.
    for name, parameter in model.named_parameters():
        if ".lora_" not in name:
            parameter.requires_grad_(False)
    return model


def encode_with(torch, model, encoder, token_ids: list[list[int]], rows: np.ndarray):
    """Unit embeddings of catalogue rows `rows` through `model`, pooled as the encoder pools."""
    pad = encoder._tokenizer.pad_token_id or 0
    width = max(max((len(token_ids[r]) for r in rows), default=1), 1)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(token_ids[r])] = torch.as_tensor(token_ids[r])
        mask[i, : len(token_ids[r])] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    # The encoder's own precision: bf16/fp16 autocast on CUDA, fp32 on the CPU.
    with encoder._autocast() if hasattr(encoder, "_autocast") else contextlib.nullcontext():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return torch.nn.functional.normalize(encoder._pool(hidden, mask), dim=1)


def encode_catalogue(torch, model, encoder, token_ids: list[list[int]], block: int = 256) -> np.ndarray:
    """Unit embeddings (numpy, float32) of every tokenised text through `model`, `block` at a time."""
    return torch.cat([encode_with(torch, model, encoder, token_ids, np.arange(start, min(start + block, len(token_ids))))
                      for start in range(0, len(token_ids), block)]).cpu().numpy()



class AdaptedEncoder:
    """The base encoder with tuned weights, as an encoder. `lora` / `adalora` / `full`: the model with
    the adapters (or every weight) loaded, run in fp32; `head`: the base encoder's unit vectors on the 2^-16 grid,
    mapped by the projection, L2-normalised and put back on the grid, as the tuned part computes them.
    Its id is the base id, the mode and the tensors' digest, so the embedding cache keeps it apart from
    the base model and from every other tuning. `until`: the tuning window's end (None: not known)."""

    def __init__(self, encoder, adapters: dict[str, np.ndarray], digest: str, rank: int = 8, alpha: int = 16,
                 full: bool = False, *, mode: str | None = None, until: datetime | None = None,
                 modules: tuple[str, ...] = ("query", "value"), source: str = ""):
        # `source`: where the adapter came from (a path or URI), for messages.
        self.encoder, self.adapters, self.rank, self.alpha, self.full = encoder, adapters, rank, alpha, full
        self.source = source
        self.mode = mode or ("full" if full else "lora")
        self.full = self.mode == "full"
        self.until, self.modules = until, tuple(modules)
        # adalora: the model is built at the rank the adapters were shaped with (pruned values are zeros).
        self.init_rank = next((len(v) for n, v in sorted(adapters.items()) if ".lora_E" in n), rank)
        kind = {"head": "head", "full": "full", "adalora": f"adalora-{self.init_rank}-{rank}-{alpha}"}.get(
            self.mode, f"lora-{rank}-{alpha}")
        self.id = f"{encoder.id}+{kind}:{digest}"
        self._model = None

    @classmethod
    def from_adapter(cls, encoder, adapter: Adapter, source: str = "") -> "AdaptedEncoder":
        if adapter.mode == "offset":
            raise ConfigError(f"adapter {source or ''}: an offset adapter moves items by their ids, not their texts, so it "
                              "cannot encode text as an encoder; it serves inside the model that tuned it. Give a head, "
                              "lora, adalora or full adapter here, or use tuned_interest with mode = \"offset\" in a feature set.")
        return cls(encoder, adapter.tensors, adapter.digest[:24], adapter.lora_rank, adapter.lora_alpha,
                   mode=adapter.mode, until=adapter.until, modules=adapter.lora_modules, source=source)

    def encode(self, texts: list[str]) -> np.ndarray:
        """One unit vector per text. A row the adapter makes NaN, infinite or zero (weights of zeros, or
        overflowing) is refused: as a missing embedding it would silently drop the item from every feature."""
        if self.mode == "head":
            vectors, expected = self._encode_head(texts)
        else:
            vectors = self._encode_model(texts)
            expected = np.ones(len(vectors), dtype=bool)  # a text model embeds every text
        with np.errstate(invalid="ignore", over="ignore"):
            unit = np.isfinite(vectors).all(axis=1) & (np.linalg.norm(vectors, axis=1) > 0.5)
        broken = np.flatnonzero(expected & ~unit)
        if len(broken):
            raise DataError(
                f"adapted encoder {self.id}: the adapter{f' {self.source}' if self.source else ''} turns "
                f"{len(broken):,} of {len(texts):,} texts (the first {texts[broken[0]]!r}) into NaN, infinite or zero "
                "vectors: its weights are degenerate (all zeros, say) or were altered. Tune it again with "
                "`recengine tune`, or drop the adapter from the encoder's parameters.")
        return vectors

    def _encode_model(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            schedule = AdaloraSchedule(init_rank=self.init_rank) if self.mode == "adalora" else None
            model = lora_model(self.encoder, self.rank, self.alpha, self.modules, full=self.full, adalora=schedule)
            parameters = dict(model.named_parameters())
            missing = sorted(set(self.adapters) - set(parameters))
            if missing:
                raise ConfigError(f"adapted encoder {self.id}: the base model has no parameters {missing[:3]}: the "
                                  "adapter was tuned on another model. Give the encoder the model it was tuned on.")
            with torch.no_grad():
                for name, value in self.adapters.items():
                    parameters[name].copy_(torch.as_tensor(value))
            self._model = model.eval()
        token_ids = self.encoder.token_ids(list(texts))
        if not token_ids:
            return np.zeros((0, 0), dtype=np.float32)
        with torch.no_grad():
            return encode_catalogue(torch, self._model, self.encoder, token_ids)

    def _encode_head(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The mapped vectors, and which rows the base encoder embedded (a NaN base row, no embedding
        for that value, stays NaN)."""
        from recengine.core.grid import on_grid

        base = on_grid(self.encoder.encode(list(texts)))
        mapped = base @ (self.adapters["projection"].astype(np.float64) / SCALE)
        with np.errstate(invalid="ignore", divide="ignore"):
            # On the grid, every value is exact in float32: the cache and the tuned part hold the same numbers.
            vectors = on_grid(mapped / np.linalg.norm(mapped, axis=1, keepdims=True)).astype(np.float32)
        return vectors, np.isfinite(base).all(axis=1)


def adapted_encoder(name: str, params: dict[str, Any], base, uri: str) -> AdaptedEncoder:
    """`base` (the encoder `name` built from `params`) with the adapter at `uri`, after checking that the
    adapter was tuned on that encoder: the same id, or the same name and parameters (apart from
    where it runs: RUNTIME_PARAMS)."""
    adapter = load_adapter(uri)
    recorded = {k: v for k, v in adapter.encoder_params.items() if k not in RUNTIME_PARAMS}
    given = {k: v for k, v in params.items() if k not in RUNTIME_PARAMS and k != "adapter"}
    same = adapter.encoder == name and (adapter.base_id == base.id or recorded == given)
    if not same:
        raise ConfigError(
            f"adapter {uri} was tuned on encoder '{adapter.encoder}' with {json.dumps(adapter.encoder_params, sort_keys=True)} "
            f"(id {adapter.base_id}), but it is given to encoder '{name}' with {json.dumps(given, sort_keys=True)} "
            f"(id {base.id}). Give the encoder the base model the adapter was tuned on, or tune one for this model "
            "with `recengine tune`.")
    return AdaptedEncoder.from_adapter(base, adapter, str(uri))
