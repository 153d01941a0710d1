"""Image encoders through Hugging Face transformers: the vision tower of a CLIP or SigLIP model
(`images`) and the text tower of the same model (`clip_text`). Both give L2-normalised rows in the
model's joint space, so a text field and an image field of one CLIP folder can be compared by cosine.

An image field holds, per item, a local path (relative ones resolve against `root`) or a `file://`
URI; the encoder only ever sees those strings. So the embedding cache is keyed by what lies behind
them (`ImageEncoder.cache_keys`): a blake2b digest of the resolved path, the file's size and its mtime
in nanoseconds. A re-run stats each file and reads no image; a file replaced or touched is encoded
again. A missing file gets a key too (its path and a marker); nothing is ever cached under it, so it is
a miss and `encode` reports it.

A value that cannot be encoded (missing, unreadable, not an image, over `max_bytes` or `max_pixels`, a
URI scheme other than file://) raises `recengine.errors.BadValue` naming the path and what to do (the
interest part adds the items that hold it), or, with `bad_images = "null"`, gives a NaN row: the item
has no embedding, and nothing is cached for it. An empty value is no image at all: a NaN row whatever
`bad_images` says.

torch and transformers are imported on first use, not at registration: listing plugins, computing
cache keys, or reading a ranker whose embeddings are cached never pays for them.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

import recengine
from recengine.errors import BadValue, PluginError
from recengine.parts.plugins import check_number
from recengine_transformers import CHARS_PER_TOKEN, Placement, padded

ENCODER_VERSION = 1
DEFAULT_MAX_BYTES = 50_000_000
DEFAULT_MAX_PIXELS = 40_000_000
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_KEY_BYTES = 16
_SAMPLE = 1 << 16  # bytes read from each end of a weights file for the model key
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://|^(file|data):", re.IGNORECASE)
_ADVICE = ('Fix or replace the file, or give the encoder bad_images = "null" to leave such items without an '
           "image embedding (their image features are then null).")


class _Tower(Placement):
    """What both encoders share: a CLIP/SigLIP model folder, device and precision (read as the
    transformers plugin reads them), batch size, and the model loaded on first use."""

    kind = ""
    features = ""  # the model's method giving this tower's embeddings

    def __init__(self, model: str | None, device: str, precision: str, batch_size: int | None):
        if not model:
            raise PluginError(
                f"{self.kind} encoder: no model given. Give model = \"PATH\", a local folder holding a CLIP or "
                "SigLIP model with its image processor and tokenizer, made once where a model hub is reachable with "
                "AutoModel.from_pretrained(NAME).save_pretrained(PATH) and the same with AutoProcessor (see the "
                "README, Image fields).")
        if not Path(model).expanduser().is_dir():
            raise PluginError(
                f"{self.kind} encoder: model '{model}' is not a folder. Give a local folder holding a CLIP or SigLIP "
                "model saved with save_pretrained (hub names are not loaded: see the README, Image fields).")
        if precision not in PRECISIONS:
            raise PluginError(f"{self.kind} encoder: precision '{precision}' is not one of {', '.join(PRECISIONS)}.")
        if batch_size is not None:
            check_number(f"{self.kind} encoder", "batch_size", batch_size, integer=True, minimum=1)
        self.model_path = Path(model).expanduser()
        self.requested_device, self.requested_precision = device, precision
        self._batch_size = batch_size
        self._model = None
        self._model_key: str | None = None

    @property
    def id(self) -> str:
        # Only what changes the output: batch size, limits and root change which rows come out, not their values.
        if self._model_key is None:
            self._model_key = model_key(self.model_path.resolve())
        return f"{self.kind}-v{ENCODER_VERSION}:{self._model_key}:{self.precision}"

    @property
    def batch_size(self) -> int:
        return self._batch_size or (256 if self.device.startswith("cuda") else 32)

    def _load(self):
        if self._model is None:
            from transformers import AutoModel

            try:
                model = AutoModel.from_pretrained(str(self.model_path), trust_remote_code=False)
                self._load_preprocessing()
            except (OSError, ValueError) as exc:
                raise PluginError(
                    f"{self.kind} encoder: cannot load a model from '{self.model_path}': {exc}. Give a folder holding "
                    "a CLIP or SigLIP model saved with save_pretrained, with its image processor and tokenizer.") from exc
            if not callable(getattr(model, self.features, None)):
                raise PluginError(
                    f"{self.kind} encoder: '{self.model_path}' holds a {type(model).__name__}, which has no "
                    f"{self.features}; give a CLIP or SigLIP model folder.")
            self._model = model.to(self.device).eval()
        return self._model

    def _load_preprocessing(self) -> None:
        raise NotImplementedError

    def _embed(self, inputs: dict[str, Any]) -> np.ndarray:
        """The tower's output for one batch of model inputs, L2-normalised float32 rows."""
        import torch

        output = getattr(self._model, self.features)(**{k: v.to(self.device) for k, v in inputs.items()})
        return torch.nn.functional.normalize(_pooled(output).float(), dim=1).cpu().numpy()


class ImageEncoder(_Tower):
    """Embeddings of the images at the given paths (or file:// URIs) from a CLIP or SigLIP vision tower."""

    kind = "images"
    features = "get_image_features"

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        bad_images: str | None = "error",
        root: str | None = None,
    ):
        super().__init__(model, device, precision, batch_size)
        check_number("images encoder", "max_bytes", max_bytes, integer=True, minimum=1)
        check_number("images encoder", "max_pixels", max_pixels, integer=True, minimum=1)
        # `--param bad_images=null` on the command line arrives as JSON null: it means the same.
        bad_images = "null" if bad_images is None else bad_images
        if bad_images not in ("error", "null"):
            raise PluginError(f"images encoder: bad_images = '{bad_images}'; give \"error\" (stop, naming the item) "
                              "or \"null\" (no embedding for that item).")
        self.max_bytes, self.max_pixels, self.bad_images = max_bytes, max_pixels, bad_images
        self.root = Path(root).expanduser().resolve() if root else Path.cwd()
        # Decoding is mostly C code that releases the GIL: a few threads keep the model fed.
        self.threads = min(8, os.cpu_count() or 1)
        self._width: int | None = None

    def path(self, value: str) -> Path:
        """The file a value names: a path (a relative one under `root`) or a file:// URI, made absolute
        without touching the disk (resolving links would cost a syscall per folder of every path, on
        every run; the stat that follows sees the file a link points to anyway)."""
        if "\0" in value:
            raise self._bad(value, None, "it holds a NUL character, which no path can")
        if _URI.match(value):
            uri = urlparse(value)
            if uri.scheme.lower() != "file":
                raise self._bad(value, None, f"'{uri.scheme}:' is not a scheme the images encoder reads: it reads "
                                             "local paths and file:// URIs. Download the images and give their paths")
            if uri.netloc not in ("", "localhost"):
                raise self._bad(value, None, f"the URI names host '{uri.netloc}'; only local files are read. Copy "
                                             "the images here and give their paths")
            return Path(os.path.abspath(self.root / url2pathname(uri.path)))
        return Path(os.path.abspath(self.root / value))

    def cache_keys(self, texts: list[str]) -> np.ndarray:
        """blake2b of each value's resolved path, file size and mtime_ns (a stat, no read); a value with
        no file to stat, keyed by itself and a marker (never cached: see the module docstring)."""
        return np.array([self._key(value) for value in texts], dtype=f"S{_KEY_BYTES}")

    def _key(self, value: str) -> bytes:
        try:
            path = self.path(value)
            status = path.stat()
            facts = f"{path}\0{status.st_size}\0{status.st_mtime_ns}"
        except (BadValue, OSError):
            facts = f"\0no file\0{value}"
        return hashlib.blake2b(facts.encode("utf-8", "surrogateescape"), digest_size=_KEY_BYTES).digest()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Rows in the order of `texts`. Batch after batch, the next batch's images are decoded and
        preprocessed in a thread pool while the model runs on this one; results keep their order."""
        import torch

        self._load()
        values, size = list(texts), self.batch_size
        out = None
        with ThreadPoolExecutor(self.threads) as pool, torch.inference_mode(), self._autocast():
            pending = self._submit(pool, values[:size])
            for start in range(0, len(values), size):
                prepared = [future.result() for future in pending]
                pending = self._submit(pool, values[start + size : start + 2 * size])
                bad = next((p for p in prepared if isinstance(p, BadValue)), None)
                if bad is not None and self.bad_images == "error":
                    for future in pending:
                        future.cancel()
                    raise bad
                rows = [i for i, p in enumerate(prepared) if isinstance(p, dict)]
                if not rows:
                    continue
                vectors = self._embed({k: torch.cat([prepared[i][k] for i in rows]) for k in prepared[rows[0]]})
                self._width = vectors.shape[1]
                if out is None:
                    out = np.full((len(values), self._width), np.nan, dtype=np.float32)
                out[start + np.array(rows)] = vectors
        return out if out is not None else np.full((len(values), self.width()), np.nan, dtype=np.float32)

    def width(self) -> int:
        """The embedding's width. Model families name it differently in their configs, so it is measured,
        once, on a blank image (only needed when no image of a call could be read)."""
        if self._width is None:
            from PIL import Image

            self._load()
            import torch

            with torch.inference_mode(), self._autocast():
                inputs = self._processor(images=Image.new("RGB", (32, 32)), return_tensors="pt")
                self._width = self._embed(dict(inputs)).shape[1]
        return self._width

    def _submit(self, pool: ThreadPoolExecutor, values: list[str]) -> list[Future]:
        return [pool.submit(self._prepare, value) for value in values]

    def _prepare(self, value: str) -> dict | BadValue | None:
        """The processor's tensors for one image; the BadValue it raised (to raise in order, or skip); None: no image."""
        if not value.strip():
            return None
        try:
            image = self._read(value)
        except BadValue as exc:
            return exc
        return dict(self._processor(images=image, return_tensors="pt"))

    def _read(self, value: str):
        """The image a value names, as RGB, once its bytes and pixels are known to be within the limits."""
        from PIL import Image, ImageOps

        path = self.path(value)
        try:
            status = path.stat()
        except FileNotFoundError:
            raise self._bad(value, path, f"there is no such file (relative paths resolve against root = {self.root})")
        except OSError as exc:
            raise self._bad(value, path, f"it cannot be read ({exc})")
        if not stat.S_ISREG(status.st_mode):  # checked before open(): opening a named pipe would wait forever
            raise self._bad(value, path, "it is a folder or a device, not an image file")
        if status.st_size > self.max_bytes:
            raise self._bad(value, path, f"it is {status.st_size:,} bytes, over max_bytes = {self.max_bytes:,}; shrink "
                                         "it, or raise max_bytes if such files are expected")
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise self._bad(value, path, f"it cannot be read ({exc})")
        try:
            # open() reads only the header: the pixels are counted before any is decoded.
            with handle, Image.open(handle) as image:
                self._check_pixels(value, path, *image.size)
                # EXIF orientation applied, as transformers' own load_image does: a phone photo stands upright.
                return ImageOps.exif_transpose(image).convert("RGB")
        except BadValue:
            raise
        except Exception as exc:  # a damaged file can make a decoder raise almost anything
            raise self._bad(value, path, _damage(exc)) from exc

    def _check_pixels(self, value: str, path: Path, width: int, height: int) -> None:
        # CLIP's processor resizes the shorter side to its size and keeps the aspect ratio: a 1 x 100,000
        # image would become 224 x 22,400,000 pixels. The limit holds for that image too.
        resized = width * height
        edge = _shortest_edge(self._processor)
        if edge and min(width, height) > 0:
            resized = int(width * height * (edge / min(width, height)) ** 2)
        if width * height > self.max_pixels or resized > self.max_pixels:
            what = f"{width:,} x {height:,} pixels"
            what += f", resized to about {resized:,} pixels" if resized > width * height else ""
            raise self._bad(value, path, f"it is {what}, over max_pixels = {self.max_pixels:,}; downscale it (or crop "
                                         "it to a common aspect ratio), or raise max_pixels if such images are expected")

    def _bad(self, value: str, path: Path | None, reason: str) -> BadValue:
        where = f" ({path})" if path is not None and str(path) != value else ""
        return BadValue(f"images encoder: image {value!r}{where} cannot be used: {reason}. {_ADVICE}", value)

    def _load_preprocessing(self) -> None:
        from transformers import AutoImageProcessor

        self._processor = AutoImageProcessor.from_pretrained(str(self.model_path), trust_remote_code=False,
                                                             **_pil_backend())


class ClipTextEncoder(_Tower):
    """Embeddings of texts from the text tower of a CLIP or SigLIP model: the images' space."""

    kind = "clip_text"
    features = "get_text_features"

    def __init__(self, model: str | None = None, device: str = "auto", precision: str = "auto",
                 batch_size: int | None = None):
        super().__init__(model, device, precision, batch_size)

    def _load_preprocessing(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), trust_remote_code=False)
        config = AutoConfig.from_pretrained(str(self.model_path), trust_remote_code=False)
        self.max_length = config.text_config.max_position_embeddings
        # SigLIP learnt on texts padded to the full length and pools the last position; CLIP pools at the
        # end-of-text token under a causal mask, so padding to the batch's longest changes nothing.
        self.pad_to_max = config.model_type.startswith("siglip")

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        self._load()
        token_ids = self.token_ids(list(texts))
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
        pad = self._tokenizer.pad_token_id or 0
        masked = "attention_mask" in self._tokenizer.model_input_names
        out = None
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(token_ids), self.batch_size):
                group = np.arange(start, min(start + self.batch_size, len(token_ids)))
                ids, mask = padded(token_ids, lengths, group, pad, self.max_length if self.pad_to_max else None)
                inputs = {"input_ids": torch.from_numpy(ids)}
                if masked:
                    inputs["attention_mask"] = torch.from_numpy(mask)
                vectors = self._embed(inputs)
                if out is None:
                    out = np.empty((len(token_ids), vectors.shape[1]), dtype=np.float32)
                out[start : start + len(group)] = vectors
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, truncated to the model's positions, never tokenising a huge text whole:
        the tokenizer sees its first max_length * CHARS_PER_TOKEN characters, and the whole text only when
        that prefix held fewer tokens than fit (long runs of spaces), so the ids are always the whole text's."""
        limit = self.max_length * CHARS_PER_TOKEN
        ids = self._tokenize([text[:limit] for text in texts])
        short = [i for i, text in enumerate(texts) if len(text) > limit and len(ids[i]) < self.max_length]
        for i, row in zip(short, self._tokenize([texts[i] for i in short]) if short else []):
            ids[i] = row
        return ids

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                               return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def _pooled(output):
    """`get_*_features` gives a tensor (transformers 4) or a model output holding it (transformers 5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise PluginError(f"recengine-images: the model's features came as {type(output).__name__} with no "
                      "pooler_output; this transformers version is not supported.")


def _damage(exc: Exception) -> str:
    """Why Pillow could not decode a file, in words."""
    from PIL import Image

    if isinstance(exc, Image.UnidentifiedImageError):  # its message names only the file handle
        return "it is not an image Pillow can read (a format it does not know, or not an image at all)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"it is over Pillow's own pixel limit, Image.MAX_IMAGE_PIXELS ({exc})"
    return f"it is damaged or truncated ({type(exc).__name__}: {exc})"


def _pil_backend() -> dict[str, Any]:
    # The same preprocessing everywhere: torchvision's resize differs slightly from Pillow's, and the
    # encoder id cannot tell which one a machine has. transformers 5 names it `backend`, 4 `use_fast`.
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


def _shortest_edge(processor) -> int | None:
    size = getattr(processor, "size", None)
    if not getattr(processor, "do_resize", True) or not hasattr(size, "get"):
        return None
    return size.get("shortest_edge")


def model_key(folder: Path) -> str:
    """A model folder known by its contents, not where it lies (the cache then survives moves): its small
    files whole (configs, image processor, tokenizer: they all change the output), and each weights file's
    name, size and first and last 64 KiB (weights of one shape trained differently differ there; reading
    gigabytes on every run would not pay)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".txt", ".model"):
            digest.update(f"{path.name}\0".encode() + path.read_bytes() + b"\0")
        elif path.suffix in (".safetensors", ".bin"):
            size = path.stat().st_size
            with path.open("rb") as handle:
                head = handle.read(_SAMPLE)
                handle.seek(max(0, size - _SAMPLE))
                tail = handle.read()
            digest.update(f"{path.name}:{size}\0".encode() + head + tail)
    return f"{folder.name}-{digest.hexdigest()[:12]}"


@recengine.hookimpl
def register_encoders(register):
    register("images", ImageEncoder,
             description="CLIP or SigLIP vision tower via transformers (a local model folder): images at local paths "
                         "or file:// URIs, cached by path, size and mtime; CUDA when available.")
    register("clip_text", ClipTextEncoder,
             description="The text tower of the same CLIP or SigLIP folder: text embeddings in the images' space.")
