"""The backbone registry: names to builders, filled by plugins found through entry points."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import threading
from dataclasses import dataclass, field, fields, replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

if TYPE_CHECKING:  # the contract imports the registry, so the registry reads it lazily
    from .backbone import BackboneSpec

__all__ = [
    "BackboneEntry",
    "UnknownBackboneError",
    "PluginLoadError",
    "register_backbone",
    "create_backbone",
    "get_backbone_entry",
    "list_backbones",
    "load_plugins",
]

PLUGIN_GROUP = "cvtasks.plugins"

T = TypeVar("T", bound=Callable[..., Any])


class UnknownBackboneError(KeyError):
    """Raised for a backbone name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginLoadError(ImportError):
    """Raised when a plugin module found through an entry point fails to import."""


@dataclass(frozen=True)
class BackboneEntry:
    """What the registry knows of one backbone: how to build it, where it comes from, what it can do."""

    name: str
    builder: Callable[..., Any]
    family: str = ""
    paper: str = ""
    reference: str = ""
    input_size: int = 224
    published_params: str = ""
    #: ImageNet-1K top-1 accuracy (%) quoted where the reference's weights carry none (make compare REFERENCE=imagenet)
    published_top1: float | None = None
    num_classes: int = 1000
    defaults: dict[str, Any] = field(default_factory=dict)
    module: str = ""
    #: the fields of the builder's BackboneSpec that this registration changes (a variant's weights)
    spec_fields: dict[str, Any] = field(default_factory=dict)

    def spec_for(self, **kwargs: Any) -> BackboneSpec:
        """The spec of this backbone built with ``kwargs`` (over the entry's defaults), without building it."""
        from .backbone import BackboneSpec

        kw = {**self.defaults, **kwargs}
        kw.pop("pretrained", None)
        if callable(getattr(self.builder, "spec_for", None)):
            base = self.builder.spec_for(**kw)
        else:  # a factory function may carry a spec; else it gets the defaults
            base = getattr(self.builder, "spec", None)
            base = base if isinstance(base, BackboneSpec) else BackboneSpec()
        return replace(base, **self.spec_fields) if self.spec_fields else base

    @property
    def spec(self) -> BackboneSpec:
        """The spec of this backbone built with the entry's defaults."""
        return self.spec_for()

    @property
    def min_input_size(self) -> int:
        """The smallest input side the backbone is declared for (``spec.min_input_size``)."""
        return self.spec.min_input_size

    def build(self, **kwargs: Any) -> Any:
        """Build the backbone with the entry's defaults overridden by ``kwargs``.

        ``pretrained`` (``imagenet``, a URL, or a local file holding the reference's state_dict; see
        cvtasks.weights) is loaded here, after the build, so that plugins need not handle it themselves.
        """
        pretrained = kwargs.pop("pretrained", None)
        model = self.builder(**{**self.defaults, **kwargs})
        if self.spec_fields:
            # the class checked and recorded its own spec; the registration adds what this variant changes
            object.__setattr__(model, "spec", replace(model.spec, **self.spec_fields))
        if pretrained:
            from .weights import backbone_weights, weights_from_checkpoint  # the registry is imported by everything

            if not weights_from_checkpoint():
                model.load_pretrained(backbone_weights(self, pretrained))
        return model


_REGISTRY: dict[str, BackboneEntry] = {}
_LOADED = False
_LOCK = threading.RLock()


def _origin(obj: Any) -> tuple[str, str]:
    return getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj))


def register_backbone(
    name: str,
    *,
    family: str = "",
    paper: str = "",
    reference: str = "",
    input_size: int = 224,
    min_input_size: int | None = None,
    spec: Mapping[str, Any] | None = None,
    published_params: str = "",
    published_top1: float | None = None,
    num_classes: int = 1000,
    **defaults: Any,
) -> Callable[[T], T]:
    """Register a backbone class or factory under ``name`` (a decorator; extra keywords become defaults).

    What the backbone can do is its class's ``spec`` (a BackboneSpec); ``spec`` here names the fields
    that this variant changes (e.g. ``spec={"mean": ..., "std": ...}`` for weights normalised their
    own way), and ``min_input_size=n`` is short for ``spec={"min_input_size": n}``.
    ``published_params`` quotes the paper's parameter count for nets without a ``reference``
    implementation to compare with (docs/backbones.md sets it beside ours); ``num_classes`` is the
    class count of the documented head (1000 for ImageNet nets, 10 for LeNet-5 and the CIFAR WRNs).
    ``published_top1`` quotes the paper's (or its weights' documented) ImageNet-1K top-1 accuracy in
    percent, with a comment citing the source, for ImageNet nets whose reference carries no such
    figure (torchvision's weights do; timm's references and paper-only nets do not):
    `make compare REFERENCE=imagenet` plots it, marked as quoted.

    A second registration under a taken name is an error, unless it is the very same
    builder being imported again (a module reloaded under the same name).
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"register_backbone needs a non-empty name, got {name!r}")
    spec_fields = _check_spec_fields(name, {**(spec or {}), **({} if min_input_size is None else {"min_input_size": min_input_size})})
    if published_top1 is not None and not 0.0 < published_top1 <= 100.0:
        raise ValueError(f"register_backbone({name!r}): published_top1 is a top-1 accuracy in percent (0, 100], "
                         f"got {published_top1!r}")

    def decorator(obj: T) -> T:
        entry = BackboneEntry(
            name=name,
            builder=obj,
            family=family,
            paper=paper,
            reference=reference,
            input_size=input_size,
            published_params=published_params,
            published_top1=published_top1,
            num_classes=num_classes,
            defaults=dict(defaults),
            module=getattr(obj, "__module__", ""),
            spec_fields=spec_fields,
        )
        with _LOCK:
            taken = _REGISTRY.get(name)
            if taken is not None and (
                _origin(taken.builder) != _origin(obj)
                or taken.defaults != entry.defaults
                or taken.spec_fields != entry.spec_fields
            ):
                raise ValueError(
                    f"backbone name {name!r} is already registered by "
                    f"{taken.module}.{_origin(taken.builder)[1]}; choose another name for "
                    f"{entry.module}.{_origin(obj)[1]}"
                )
            _REGISTRY[name] = entry
        return obj

    return decorator


def _check_spec_fields(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """The registration's spec changes, refused now (naming the backbone) when a field or value is wrong."""
    from .backbone import BackboneSpec

    valid = [f.name for f in fields(BackboneSpec)]
    unknown = sorted(set(changes) - set(valid))
    if unknown:
        raise ValueError(f"register_backbone({name!r}): spec has no fields {unknown}; valid fields are {valid}")
    try:
        replace(BackboneSpec(), **changes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"register_backbone({name!r}): {exc}") from None
    return dict(changes)


def load_plugins() -> None:
    """Import every plugin module declared in the ``cvtasks.plugins`` entry-point group (once)."""
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True  # set first: a plugin that looks up the registry while importing must not recurse
        for ep in entry_points(group=PLUGIN_GROUP):
            try:
                ep.load()
            except Exception as exc:  # a broken third-party plugin must say which one it is
                raise PluginLoadError(
                    f"cvtasks plugin {ep.name!r} ({ep.value}) failed to import: {exc}. "
                    f"Fix or uninstall the package that declares it."
                ) from exc


def reload_plugins() -> None:
    """Look at the entry points again (after installing a plugin package in a running process)."""
    global _LOADED
    with _LOCK:
        _LOADED = False
        importlib.invalidate_caches()
    load_plugins()


def _closest(name: str, n: int = 5) -> list[str]:
    names = list(_REGISTRY)
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    if not close:  # fall back to names sharing a prefix, e.g. "vgg" -> vgg11, vgg13, ...
        stem = name.rstrip("0123456789_").lower()
        close = sorted(n_ for n_ in names if stem and n_.lower().startswith(stem))[:n]
    return close


def get_backbone_entry(name: str) -> BackboneEntry:
    """The registry entry for ``name``; an unknown name raises with the closest registered names."""
    load_plugins()
    if name.startswith("timm/") and name not in _REGISTRY:
        bridge = _REGISTRY.get("timm/*")
        if bridge is not None:
            return BackboneEntry(
                name=name,
                builder=bridge.builder,
                family=bridge.family,
                paper=bridge.paper,
                reference=name[len("timm/") :],
                defaults={**bridge.defaults, "model_name": name[len("timm/") :]},
                module=bridge.module,
                spec_fields=bridge.spec_fields,
            )
    try:
        return _REGISTRY[name]
    except KeyError:
        close = _closest(name)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{hint} Run `make backbones` (or "
            f"`python -m cvtasks backbones`) to list the {len(_REGISTRY)} registered names."
        ) from None


def create_backbone(name: str, **kwargs: Any) -> Any:
    """Build the registered backbone ``name``; keywords go to its builder (in_chans, pretrained, ...)."""
    return get_backbone_entry(name).build(**kwargs)


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered backbone names, sorted, optionally filtered by a shell-style pattern."""
    load_plugins()
    names = sorted(n for n in _REGISTRY if n != "timm/*")
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, pat)]
    return names
