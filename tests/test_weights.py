"""Published weights by name: the cache, downloads with hash checks, clear errors, normalisation that follows the weights.

Sockets are blocked in this file: nothing here may reach the network. The cache-hit path of every net
with a reference is also taken by each family's parity test (``check_parity`` goes through a fresh
cache and ``pretrained='imagenet'``), so the per-net logits are checked there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from cvtasks.backbone import create_classifier
from cvtasks.registry import create_backbone, get_backbone_entry, list_backbones
from cvtasks.summary import backbone_table
from cvtasks.weights import (
    WeightsUnavailableError,
    backbone_imagenet,
    cache_dir,
    imagenet_weights,
    torch_home,
)

pytestmark = pytest.mark.disable_socket

WITH_REFERENCE = [n for n in list_backbones() if ":" in get_backbone_entry(n).reference]


@pytest.fixture
def cache(tmp_path: Path):
    """An empty torch.hub cache of the test's own."""
    with torch_home(tmp_path / "torch") as home:
        yield home / "hub" / "checkpoints"


def _resnet18_reference() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_every_net_with_a_reference_has_published_weights_and_their_normalisation() -> None:
    for name in WITH_REFERENCE:
        entry = get_backbone_entry(name)
        published = backbone_imagenet(entry)
        assert published is not None, name
        # the data is normalised as the weights expect, through the backbone's declared spec
        spec = entry.spec.normalization
        assert spec.mean == pytest.approx(published.mean) and spec.std == pytest.approx(published.std), name
    # torchvision's GoogLeNet and Inception-v3 weights re-normalise their inputs to 0.5/0.5 themselves
    assert imagenet_weights("torchvision:googlenet").mean == (0.5, 0.5, 0.5)
    assert imagenet_weights("torchvision:resnet18").file_name == "resnet18-f37072fd.pth"
    hub = imagenet_weights("timm:inception_v4")
    assert hub.url.startswith("https://huggingface.co/timm/inception_v4") and hub.file_name.endswith(".safetensors")


def test_backbone_table_marks_the_names_with_published_weights() -> None:
    rows = {line.split()[0]: line.split()[-1] for line in backbone_table(measure=False).splitlines()[2:]}
    assert rows["resnet18"] == "imagenet" and rows["xception"] == "imagenet"
    assert rows["lenet5"] == "-" and rows["wrn28_10"] == "-"


def test_cached_weights_load_without_the_network_head_kept_or_replaced(cache: Path) -> None:
    ref = _resnet18_reference()
    imagenet_weights("torchvision:resnet18").put(ref.state_dict())
    x = torch.rand(2, 3, 64, 64)
    ours = create_classifier("resnet18", num_classes=1000, pretrained="imagenet").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    # another class count: the backbone is the published one, the head is new
    three = create_classifier("resnet18", num_classes=3, pretrained="imagenet")
    torch.testing.assert_close(three.backbone.stages["stem"][0].weight, ref.conv1.weight)
    assert three.head.fc.weight.shape == (3, 512)
    # the registry's build (the path of the segmentation and detection tasks) takes the name too
    body = create_backbone("resnet18", pretrained="imagenet")
    torch.testing.assert_close(body.stages["layer4"][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_a_timm_bridge_backbone_loads_its_models_published_weights(cache: Path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("resnet18").eval()
    published = backbone_imagenet(get_backbone_entry("timm/resnet18"))
    assert published is not None and published.file_name.endswith(".safetensors")
    published.put(ref.state_dict())
    body = create_backbone("timm/resnet18", pretrained="imagenet").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.forward_features(x)
        got = list(body(x).values())[-1]
    torch.testing.assert_close(got, expected)


def _weights_file(folder: Path, stem: str, sha_prefix: str | None = None) -> tuple[Path, str]:
    """resnet18 reference weights saved as ``<stem>-<sha256 prefix>.pth`` (the real prefix unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "plain.pth"
    torch.save(_resnet18_reference().state_dict(), tmp)
    prefix = sha_prefix or hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / f"{stem}-{prefix}.pth"
    tmp.rename(path)
    return path, prefix


def test_a_url_is_downloaded_once_into_the_cache_and_its_hash_checked(cache: Path, tmp_path: Path) -> None:
    path, _ = _weights_file(tmp_path / "server", "mine")
    url = path.as_uri()  # file://: the real download code, no network
    body = create_backbone("resnet18", pretrained=url)
    cached = cache / path.name
    assert cached.is_file() and cached.read_bytes() == path.read_bytes()
    torch.testing.assert_close(body.stages["stem"][0].weight, _resnet18_reference().conv1.weight)
    path.unlink()  # the second use reads the cache only
    create_backbone("resnet18", pretrained=url)


def test_a_download_whose_hash_does_not_match_its_name_fails_and_is_not_kept(cache: Path, tmp_path: Path) -> None:
    path, _ = _weights_file(tmp_path / "server", "mine", sha_prefix="deadbeef")
    with pytest.raises(ValueError, match=r"sha256 prefix.*mine-deadbeef\.pth.*expected deadbeef"):
        create_backbone("resnet18", pretrained=path.as_uri())
    assert not (cache / path.name).exists() and not list(cache.glob("*.partial"))


def test_no_network_and_nothing_cached_names_the_url_the_cache_path_and_make_weights(cache: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("resnet18", pretrained="imagenet")
    message = str(info.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(cache / "resnet18-f37072fd.pth") in message and "make weights NAME=resnet18" in message


def test_a_corrupt_cached_file_is_named(cache: Path) -> None:
    published = imagenet_weights("torchvision:resnet18")
    cache.mkdir(parents=True)
    published.path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth.*corrupt.*delete it"):
        create_classifier("resnet18", num_classes=3, pretrained="imagenet")


def test_wrong_names_and_nets_without_weights_are_clear_errors(cache: Path) -> None:
    with pytest.raises(ValueError, match=r"'lenet5' has no published ImageNet weights.*make backbones"):
        create_backbone("lenet5", pretrained="imagenet")
    with pytest.raises(FileNotFoundError, match=r"'imagenett' is neither a weights name nor an existing file.*'imagenet'"):
        create_backbone("resnet18", pretrained="imagenett")
    with pytest.raises(ValueError, match=r"names no file"):
        create_backbone("resnet18", pretrained="https://example.org/")


def test_cache_dir_follows_torch_home(tmp_path: Path) -> None:
    with torch_home(tmp_path):
        assert cache_dir() == tmp_path / "hub" / "checkpoints"
    assert cache_dir() != tmp_path / "hub" / "checkpoints"


def test_a_run_from_published_weights_is_evaluated_and_predicted_from_its_checkpoint_alone(tmp_path: Path, workdir: Path) -> None:
    """evaluate / predict-run restore every weight from the checkpoint: the published file is not read again."""
    from conftest import run_cli

    with torch_home(tmp_path / "torch"):
        published = imagenet_weights("torchvision:resnet18")
        published.put(_resnet18_reference().state_dict())
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    fit = run_cli(["fit", "--config", "configs/classification.yaml", "--config", "configs/logger/csv.yaml",
                   "--model.backbone", "resnet18", "--model.pretrained", "imagenet", "--data.num_samples", "15",
                   "--data.img_size", "32", "--data.batch_size", "5", "--data.num_workers", "0",
                   "--trainer.max_epochs", "1", "--run_name", "tuned"], workdir, env=env)
    assert fit.returncode == 0, fit.stderr[-2000:]
    # any read of the published file now fails loudly ("corrupt"): evaluating must not need it
    (tmp_path / "torch" / "hub" / "checkpoints" / published.file_name).write_bytes(b"gone")
    evaluate = run_cli(["evaluate", "tuned"], workdir, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert (workdir / "runs" / "tuned" / "test_metrics.json").is_file()
    images = workdir / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "red.png")
    predict = run_cli(["predict-run", "tuned", str(images)], workdir, env=env)
    assert predict.returncode == 0, predict.stderr[-2000:]
