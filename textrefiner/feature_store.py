"""A feature store: the frozen image encoder's output for each test image, kept on disk.

For zero-shot CLIP, CoOp and CoCoOp (with or without TextRefiner) the image side at evaluation is
the frozen, un-prompted CLIP image encoder on an un-augmented image, so every run of a sweep that
evaluates the same test image computes the same features. With TEST.FEATURE_STORE DIR
(`--feature-store DIR`) evaluation reads them from DIR and computes (and writes) only the missing
ones; the logits are those of a run without the store, bit for bit on the same machine, because an
entry is exactly the tensor the model computed (its dtype, its bits).

Keys (a wrong hit must be impossible, so anything that could change a feature changes the key):
* the model: a digest of the image encoder's state dict (names, dtypes, shapes, bytes), its
  class and its module tree (what the weights leave out: activations, LayerNorm eps, head
  counts; two transformers CLIPs with the same weights and another `hidden_act` differ there),
  the test transform (its repr: size, interpolation, crop, normalisation), the precision
  (PREC, the parameters' dtype, amp's autocast dtype), the device type (GPU name; on a CPU the
  thread count and kernel settings), and the torch and textrefiner versions. They name the
  folder `DIR/<model digest>/` (`key.json` in it spells them out);
* the image: its absolute path, size and modification time (ns), and its test batch (the ordered
  images of the batch it is evaluated in, and its row): the encoder's output for an image can
  differ in the last bits with its batch (see `batch_entry_keys`).

Layout and safety: `DIR/<model digest>/<group>/<random>.feat` files (group: the dataset name),
one per computed test batch, each written whole to a temporary file, flushed to disk and
renamed, so a reader sees a complete file or none, and runs that write at once (seeds in
parallel) never touch each other's files. A
killed writer leaves at most its temporary file, which the next run on that machine removes. A
file that is not a complete store file (truncated, foreign, checksum wrong) is reported in one
line, moved aside to `<name>.bad`, and its features are computed again.

File format: MAGIC, 8-byte little-endian header length, a JSON header {"dtype", "shape", "keys",
"digest" (blake2b of the payload)}, then the raw tensor bytes (row i belongs to keys[i]). No pickle:
reading a store file never runs code.
"""
import hashlib
import json
import os
import socket
import struct
import uuid
from typing import Callable, Dict, List, Sequence

import torch

from . import faults
from .errors import UserError, output_failed

FORMAT_VERSION = 1
MAGIC = b"TRFSTORE1\n"
SUFFIX = ".feat"
TMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
def weights_digest(module: torch.nn.Module) -> str:
    """blake2b over the module's state dict: every name, dtype, shape and byte."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def modules_digest(module: torch.nn.Module) -> str:
    """blake2b over the module tree: its repr (module classes, activations, LayerNorm eps) and
    each attention's head count, which the repr does not show."""
    heads = [f"{name}:{child.num_heads}" for name, child in module.named_modules()
             if isinstance(child, torch.nn.MultiheadAttention)]
    return hashlib.blake2b("\n".join([repr(module)] + heads).encode(), digest_size=20).hexdigest()


def device_name(device: torch.device) -> str:
    """The device type, and for a GPU its model (kernels, hence last bits, differ between them)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def cpu_kernels() -> dict:
    """What picks the CPU kernels, hence their summation order: thread count, ATen's vector
    capability and the oneDNN / MKL settings that change it."""
    return {"threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ.get(name, "") for name in (
                "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR",
                "MKL_ENABLE_INSTRUCTIONS")}}


def model_key(image_encoder: torch.nn.Module, transform, precision: str, device: torch.device,
              autocast) -> dict:
    """Everything the stored image features depend on besides the image itself."""
    from . import __version__

    parameter = next(image_encoder.parameters())
    with autocast():
        autocast_dtype = (torch.get_autocast_dtype(device.type)
                          if torch.is_autocast_enabled(device.type) else None)
    return {
        "format": FORMAT_VERSION,
        "output": "PromptMethod.encode_images(images).features",
        "encoder": f"{type(image_encoder).__module__}.{type(image_encoder).__qualname__}",
        "weights": weights_digest(image_encoder),
        "modules": modules_digest(image_encoder),
        "transform": repr(transform),
        "precision": precision,
        "parameter_dtype": str(parameter.dtype),
        "autocast_dtype": str(autocast_dtype),
        "device": device_name(device),
        "cpu_kernels": cpu_kernels() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "textrefiner": __version__,
    }


def image_key(path: str) -> str:
    """Key of one image file: its absolute path, size and modification time."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise UserError(f"Cannot read image {path} ({exc}). Check the file, or prepare the "
                        "dataset again.") from None
    text = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def batch_entry_keys(image_keys: Sequence[str], batch_size: int) -> List[str]:
    """The entry key of each image: its test batch (the ordered image keys of the batch it is
    evaluated in) and its row in it.

    The image encoder's output for one image can differ in the last bits with the batch it runs
    in (matrix-multiply kernels block by batch size), so an entry is only exact for the same
    batch. Every run of a sweep evaluates a split in the same batches (same split, order and
    DATALOADER.TEST.BATCH_SIZE), so they all hit."""
    keys = []
    for start in range(0, len(image_keys), batch_size):
        batch = image_keys[start:start + batch_size]
        digest = hashlib.blake2b("\n".join(batch).encode(), digest_size=16).hexdigest()
        keys += [f"{digest}-{row}" for row in range(len(batch))]
    return keys


def _digest_of(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
class StoreFileError(Exception):
    """A file in the store that is not a complete store file."""


def encode_file(keys: Sequence[str], features: torch.Tensor) -> bytes:
    """The bytes of a store file holding `features` [n, ...], row i under keys[i]."""
    features = features.detach().cpu().contiguous()
    if features.shape[0] != len(keys):
        raise ValueError(f"{len(keys)} keys for {features.shape[0]} feature rows")
    payload = features.reshape(-1).view(torch.uint8).numpy().tobytes()
    header = json.dumps({
        "dtype": str(features.dtype).replace("torch.", ""), "shape": list(features.shape),
        "keys": list(keys), "digest": hashlib.blake2b(payload, digest_size=16).hexdigest(),
    }).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + payload


def read_header(handle) -> dict:
    """Check the magic and read the JSON header of an open store file."""
    if handle.read(len(MAGIC)) != MAGIC:
        raise StoreFileError("not a textrefiner feature-store file")
    raw = handle.read(8)
    if len(raw) != 8:
        raise StoreFileError("truncated header")
    text = handle.read(struct.unpack("<Q", raw)[0])
    try:
        header = json.loads(text)
        dtype = getattr(torch, header["dtype"])
        shape, keys = [int(n) for n in header["shape"]], list(header["keys"])
        digest = str(header["digest"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreFileError("truncated or unreadable header") from None
    if (not isinstance(dtype, torch.dtype) or not shape or shape[0] != len(keys) or not keys
            or min(shape) < 0 or not all(isinstance(key, str) for key in keys)):
        raise StoreFileError("inconsistent header")
    return {"dtype": dtype, "shape": shape, "keys": keys, "digest": digest}


def read_payload(handle, header: dict) -> torch.Tensor:
    """The tensor after the header, checked against its length and digest."""
    itemsize = torch.empty(0, dtype=header["dtype"]).element_size()
    size = itemsize
    for n in header["shape"]:
        size *= n
    payload = handle.read(size + 1)
    if len(payload) != size:
        raise StoreFileError(f"payload of {len(payload)} bytes, expected {size} (truncated)"
                             if len(payload) < size else "trailing bytes after the payload")
    if hashlib.blake2b(payload, digest_size=16).hexdigest() != header["digest"]:
        raise StoreFileError("checksum mismatch")
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return flat.view(header["dtype"]).reshape(header["shape"])


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
class FeatureStore:
    """Stored features of one model key under `root`, grouped (e.g. per dataset)."""

    def __init__(self, root: str, key: dict, log: Callable[[str], None] = print):
        self.key = key
        self.folder = os.path.join(os.path.abspath(root), _digest_of(key))
        self.log = log
        try:
            os.makedirs(self.folder, exist_ok=True)
            description = os.path.join(self.folder, "key.json")
            if not os.path.isfile(description):
                self._atomic_write(self.folder, json.dumps(key, indent=1, sort_keys=True).encode(),
                                   description)
        except OSError as exc:
            raise output_failed(self.folder, exc) from None

    def _group_folder(self, group: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in group) or "default"
        return os.path.join(self.folder, safe)

    def read(self, group: str, wanted: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The stored rows of the `wanted` keys found in the group: {key: tensor}."""
        folder = self._group_folder(group)
        if not os.path.isdir(folder):
            return {}
        _remove_dead_writers_files(folder)
        wanted, found = set(wanted), {}
        for name in sorted(os.listdir(folder)):
            if not name.endswith(SUFFIX):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as handle:
                    header = read_header(handle)
                    if wanted.isdisjoint(header["keys"]):
                        continue
                    rows = read_payload(handle, header)
            except FileNotFoundError:  # moved aside by another reader meanwhile
                continue
            except StoreFileError as exc:
                self._set_aside(path, str(exc))
                continue
            for key, row in zip(header["keys"], rows):
                if key in wanted and key not in found:
                    found[key] = row
        return found

    def write(self, group: str, keys: Sequence[str], features: torch.Tensor) -> str:
        """Add one file holding `features` [n, ...] under `keys`; returns its path."""
        folder = self._group_folder(group)
        path = os.path.join(folder, uuid.uuid4().hex + SUFFIX)
        try:
            os.makedirs(folder, exist_ok=True)
            # TEXTREFINER_KILL_AT=store_write=N stops the N-th features file before its rename
            self._atomic_write(folder, encode_file(keys, features), path,
                               before_rename=faults.before_store_rename)
        except OSError as exc:
            raise output_failed(path, exc) from None
        return path

    @staticmethod
    def _atomic_write(folder: str, data: bytes, path: str, before_rename=None):
        temporary = os.path.join(folder, f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"
                                         f"{uuid.uuid4().hex}")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if before_rename is not None:
                before_rename(temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def _set_aside(self, path: str, reason: str):
        try:
            os.replace(path, path + ".bad")
        except FileNotFoundError:
            return  # another reader set it aside first
        except OSError as exc:
            raise output_failed(path, exc) from None
        self.log(f"feature store: {path} is not a complete store file ({reason}); moved aside to "
                 f"{os.path.basename(path)}.bad, its features are computed again")


def _remove_dead_writers_files(folder: str):
    """Remove temporary files left by killed writers of this machine (pid no longer running)."""
    prefix = f"{TMP_PREFIX}{socket.gethostname()}-"
    for name in os.listdir(folder):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# Evaluation through the store
# --------------------------------------------------------------------------------------------
def store_refusal(cls) -> str:
    """Why the image features of method class `cls` cannot come from the store, or "" when they
    can: only PromptMethod's own frozen, un-prompted image path (zero-shot CLIP, CoOp, CoCoOp,
    with or without TextRefiner) is stored; the methods that prompt or train the image side
    (MaPLe, PromptSRC, PromptKD's student) override it."""
    from .methods.base import PromptMethod

    if cls.encode_images is PromptMethod.encode_images and cls.forward is PromptMethod.forward:
        return ""
    return (f"{cls.__name__} prompts or trains the image encoder, so its image features are "
            "not stored")


class StoredEvaluation:
    """Evaluation logits of a method whose image features come from a FeatureStore.

    `transform` is the test transform (part of the key); `autocast()` gives the run's autocast
    context (amp, or a no-op).
    """

    def __init__(self, root: str, model, transform, precision: str, device: torch.device,
                 autocast: Callable, log: Callable[[str], None]):
        self.model, self.device, self.autocast, self.log = model, device, autocast, log
        key = model_key(model.image_encoder, transform, precision, device, autocast)
        self.store = FeatureStore(root, key, log)
        log(f"feature store: image features of {type(model).__name__} in {self.store.folder}")

    def image_features(self, items, group: str, batch_size: int, loader_of) -> torch.Tensor:
        """Features [N, ...] (CPU, as the model computed them) of the items, read, or computed and
        written. Entries are per test batch (see `batch_entry_keys`): a batch with any entry
        missing runs through the image encoder whole, as it does without the store.
        `loader_of(items)` builds the un-augmented test loader over a list of items, in batches
        of `batch_size` (with "img", and "index": the position in that list)."""
        entries = batch_entry_keys([image_key(item.impath) for item in items], batch_size)
        found = self.store.read(group, entries)
        missing = [i for start in range(0, len(items), batch_size)
                   if any(key not in found for key in entries[start:start + batch_size])
                   for i in range(start, min(start + batch_size, len(items)))]
        for batch in loader_of([items[i] for i in missing]) if missing else ():
            positions = [missing[int(j)] for j in batch["index"]]
            if positions[0] % batch_size or len(positions) != min(batch_size,
                                                                  len(items) - positions[0]):
                raise RuntimeError("the feature store's loader did not keep the test batches")
            with self.autocast():
                features = self.model.encode_images(batch["img"].to(self.device)).features
            batch_keys = [entries[i] for i in positions]
            self.store.write(group, batch_keys, features)
            found.update(zip(batch_keys, features.detach().cpu()))
        self.log(f"feature store: {len(items) - len(missing)} of {len(items)} images read, "
                 f"{len(missing)} computed by the image encoder")
        return torch.stack([found[key] for key in entries])

    def logits(self, features: torch.Tensor, batch_size: int):
        """(start, logits) batch by batch, in the batches a run without the store evaluates."""
        for start in range(0, features.shape[0], batch_size):
            with self.autocast():
                yield start, self.model.forward_features(
                    features[start:start + batch_size].to(self.device))


def maybe_stored_evaluation(root: str, model, transform, precision, device, autocast,
                            log) -> "StoredEvaluation | None":
    """A StoredEvaluation when TEST.FEATURE_STORE is set and the method can use it; None (and a
    log line saying why, when the store was asked for) otherwise."""
    if not root:
        return None
    refusal = store_refusal(type(model))
    if refusal:
        log(f"feature store: not used: {refusal} (TEST.FEATURE_STORE {root})")
        return None
    return StoredEvaluation(root, model, transform, precision, device, autocast, log)


def labels_of(items: List) -> torch.Tensor:
    return torch.tensor([int(item.label) for item in items], dtype=torch.long)
