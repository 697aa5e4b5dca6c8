"""Published weights by name: where they come from, the one cache they are fetched into, their state_dicts.

``pretrained`` takes a local file, a URL, or a name: ``imagenet`` for a backbone with a torchvision
or timm reference (the reference's published ImageNet weights), or a task preset such as ``coco``
for the task models that torchvision publishes (cvtasks.presets). Every file lives in torch.hub's
cache, ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints``), under its URL's own
file name, and is fetched at most once: a cached file is used as it is, without the network, so
a machine without internet works from a copy of that folder (``make weights NAME=...`` fills it).
A file whose name carries a sha256 prefix (torchvision's ``resnet18-f37072fd.pth``) is checked
against it on download, as torch.hub does.

Converting a reference's state_dict to our layout is the plugins' business (``remap_state_dict``);
this module only fetches and reads, and builds the reference through its own library's loading
code (torchvision's weights enums, timm's pretrained configuration), so that whatever fixes those
libraries apply to a published checkpoint (DenseNet's old key names, GoogLeNet's auxiliary heads,
timm's checkpoint filters) apply here too.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlparse

import torch
from torch import Tensor, nn

__all__ = [
    "IMAGENET",
    "PublishedWeights",
    "WeightsUnavailableError",
    "cache_dir",
    "fetch",
    "from_checkpoint",
    "imagenet_weights",
    "is_url",
    "put_in_cache",
    "read_weights_file",
    "torch_home",
    "weights_from_checkpoint",
]

#: the name that asks a backbone for its reference's published ImageNet weights
IMAGENET = "imagenet"
#: torch.hub's rule: a file name ``<stem>-<hex>.<ext>`` names the first hex digits of its sha256
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
#: torchvision's builders turn on ``transform_input`` with these nets' weights: the net re-normalises
#: ImageNet-normalised inputs to mean = std = 0.5 itself, so what the weights expect is 0.5/0.5
_TRANSFORM_INPUT = frozenset({"googlenet", "inception_v3"})


_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("weights_from_checkpoint", default=False)


@contextlib.contextmanager
def from_checkpoint() -> Iterator[None]:
    """Models built in this block take their weights from a checkpoint: ``pretrained`` shapes them, nothing is read.

    Evaluating, predicting with or resuming a run restores every weight from its checkpoint, so
    the published file is neither needed (a machine without the cache can evaluate a run) nor read.
    """
    token = _FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _FROM_CHECKPOINT.reset(token)


def weights_from_checkpoint() -> bool:
    """True inside :func:`from_checkpoint`: build what ``pretrained`` names, load nothing."""
    return _FROM_CHECKPOINT.get()


class WeightsUnavailableError(RuntimeError):
    """Published weights are neither in the cache nor downloadable from here."""


def cache_dir() -> Path:
    """torch.hub's checkpoint cache, ``$TORCH_HOME/hub/checkpoints``: where every published file is kept."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextlib.contextmanager
def torch_home(path: str | os.PathLike) -> Iterator[Path]:
    """Point torch.hub's cache at ``path/hub`` for the duration (tests and checks pre-fill one of their own)."""
    old_env, old_dir = os.environ.get("TORCH_HOME"), torch.hub._hub_dir  # noqa: SLF001 - set_dir has no getter
    os.environ["TORCH_HOME"] = str(path)
    torch.hub._hub_dir = None  # noqa: SLF001 - let get_dir() follow TORCH_HOME again
    try:
        yield Path(path)
    finally:
        if old_env is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old_env
        torch.hub._hub_dir = old_dir  # noqa: SLF001


def is_url(value: str) -> bool:
    """True for ``http(s)://`` and ``file://`` addresses."""
    return urlparse(str(value)).scheme in ("http", "https", "file")


def url_file_name(url: str) -> str:
    """The file name a URL is cached under: its own (the last path component)."""
    name = os.path.basename(unquote(urlparse(url).path))
    if not name:
        raise ValueError(f"URL {url!r} names no file; give the address of a weights file (e.g. .../resnet18-f37072fd.pth)")
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, file_name: str | None = None, *, hint: str = "") -> Path:
    """The cached copy of ``url`` (downloaded once into :func:`cache_dir` under ``file_name``, default the URL's).

    A name carrying a sha256 prefix is checked on download; a mismatch deletes the download and is
    an error. No network and nothing cached is an error naming the URL, the path to put the file
    at and ``hint`` (how to fetch it ahead of time, e.g. ``make weights NAME=resnet18``).
    """
    name = file_name or url_file_name(url)
    path = cache_dir() / name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), None, progress=sys.stderr.isatty())
        except Exception as exc:  # no route, DNS, HTTP errors, sockets blocked: all mean "not from here"
            raise WeightsUnavailableError(
                f"cannot download {url} ({type(exc).__name__}: {exc}) and it is not cached. Put the file at "
                f"{path} (copy the cache folder {path.parent} from a machine with internet"
                + (f", where `{hint}` fills it" if hint else "")
                + ")"
            ) from exc
        expected = _HASH_IN_NAME.search(name)
        if expected:
            got = _sha256(tmp)
            if not got.startswith(expected.group(1)):
                raise ValueError(
                    f"the file downloaded from {url} does not match the sha256 prefix in its name {name!r} "
                    f"(expected {expected.group(1)}..., got {got[:len(expected.group(1))]}...): the download is "
                    f"corrupt or the URL serves another file; it was not kept"
                )
        shutil.move(str(tmp), path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state_dict from a ``torch.save`` file or a ``.safetensors`` file; a file that cannot be read is a clear error."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read the weights file {str(p)!r} ({type(exc).__name__}: {exc}); it is corrupt or not a "
            f"checkpoint: delete it and fetch it again"
        ) from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(p)!r} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def put_in_cache(file_name: str, state_dict: Mapping[str, Tensor]) -> Path:
    """Write ``state_dict`` into the cache as ``file_name`` (``.safetensors`` or a ``torch.save`` file)."""
    path = cache_dir() / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage: each is written as its own copy
        save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(dict(state_dict), path)
    return path


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: its URL, the file name it is cached under, the reference it belongs to.

    ``reference`` is ``'torchvision:NAME'`` or ``'timm:NAME'``: the model whose loading code reads
    the file (``load_reference``). ``mean``/``std`` are what the weights expect of their inputs.
    """

    reference: str
    url: str
    file_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hint: str = ""

    @property
    def path(self) -> Path:
        """Where the file is (or will be) in the cache."""
        return cache_dir() / self.file_name

    def fetch(self) -> Path:
        """The cached file, downloaded first if it is not there."""
        return fetch(self.url, self.file_name, hint=self.hint)

    def put(self, state_dict: Mapping[str, Tensor]) -> Path:
        """Write ``state_dict`` into the cache as this file (checks and tests pre-fill a cache this way)."""
        return put_in_cache(self.file_name, state_dict)

    def load_reference(self, **builder_kwargs: Any) -> nn.Module:
        """The reference model with these weights, read from the cache (fetched first if needed), in eval mode.

        ``builder_kwargs`` go to torchvision's builder (a detector's ``min_size``, say: the task
        presets' tests build the reference at their own small image size).
        """
        path = self.fetch()
        source, name = self.reference.split(":", 1)
        try:
            if source == "torchvision":
                tv = importlib.import_module("torchvision.models")
                # torchvision finds the file in the same cache under the same name and reads it without
                # the network; its builder applies what the weights need (transform_input, key renames)
                model = tv.get_model(name, weights="DEFAULT", **builder_kwargs)
                if getattr(model, "AuxLogits", None) is not None:
                    # inception_v3 keeps its auxiliary classifier by default; it only helps training, as googlenet's
                    model.aux_logits, model.AuxLogits = False, None
            else:
                timm = importlib.import_module("timm")
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **builder_kwargs)
        except Exception as exc:
            raise ValueError(
                f"cannot load the published weights of {self.reference} from {str(path)!r} "
                f"({type(exc).__name__}: {exc}); the file is corrupt or not these weights: delete it and "
                f"fetch it again" + (f" (`{self.hint}`)" if self.hint else "")
            ) from exc
        return model.eval()

    def state_dict(self) -> dict[str, Tensor]:
        """The reference's state_dict with these weights (in the reference's layout)."""
        return self.load_reference().state_dict()


def _torchvision_imagenet(name: str) -> PublishedWeights | None:
    tv = importlib.import_module("torchvision.models")
    try:
        weights = tv.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    if name in _TRANSFORM_INPUT:
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        preset = weights.transforms()
        mean, std = tuple(preset.mean), tuple(preset.std)
    return PublishedWeights(f"torchvision:{name}", weights.url, url_file_name(weights.url), mean, std)


def _timm_imagenet(name: str) -> PublishedWeights | None:
    timm = importlib.import_module("timm")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown to this timm
        cfg = None
    if cfg is None:
        return None
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if cfg.hf_hub_id:
        # the Hub names every file model.safetensors: the cache names it after the repository
        repo = cfg.hf_hub_id
        file_name = f"{repo.replace('/', '--')}.safetensors"
        return PublishedWeights(f"timm:{name}", f"https://huggingface.co/{repo}/resolve/main/model.safetensors",
                                file_name, mean, std)
    if cfg.url:
        return PublishedWeights(f"timm:{name}", cfg.url, url_file_name(cfg.url), mean, std)
    return None


def imagenet_weights(reference: str, hint: str = "") -> PublishedWeights | None:
    """The published ImageNet weights of ``reference`` (``'torchvision:NAME'`` or ``'timm:NAME'``), or None."""
    if ":" not in reference:
        return None
    source, name = reference.split(":", 1)
    found = {"torchvision": _torchvision_imagenet, "timm": _timm_imagenet}.get(source, lambda _: None)(name)
    if found is None:
        return None
    return PublishedWeights(found.reference, found.url, found.file_name, found.mean, found.std, hint)


def backbone_imagenet(entry: Any) -> PublishedWeights | None:
    """The published ImageNet weights of registry entry ``entry`` (its reference's), or None where it has none."""
    reference = entry.reference
    if entry.name.startswith("timm/"):  # the bridge: the timm model it wraps is its own reference
        reference = f"timm:{entry.defaults.get('model_name', entry.name[len('timm/'):])}"
    return imagenet_weights(reference, hint=f"make weights NAME={entry.name}")


def backbone_weights(entry: Any, pretrained: str | os.PathLike) -> Mapping[str, Tensor] | Path:
    """What ``pretrained`` names for registry entry ``entry``: a state_dict (``imagenet``) or a local file.

    ``imagenet`` is the reference's published weights (through the cache); a URL is fetched into the
    cache and its file returned; anything else is a local file, which must exist.
    """
    value = str(pretrained)
    if value == IMAGENET:
        published = backbone_imagenet(entry)
        if published is None:
            why = f"its reference is {entry.reference}" if entry.reference else "it has no reference implementation"
            raise ValueError(
                f"backbone {entry.name!r} has no published ImageNet weights ({why}); `make backbones` marks the "
                f"names that have them. Train it from scratch (no pretrained) or pass a local file or URL of its weights"
            )
        return published.state_dict()
    if is_url(value):
        return fetch(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained {value!r} is neither a weights name nor an existing file: pass 'imagenet' (the published "
            f"weights of the backbone's reference), a URL, or the path of a file holding a state_dict"
            + ("; task presets such as 'coco' name a whole task model and go to the task (--model.pretrained)"
               if os.sep not in value and "." not in value else "")
        )
    return path
