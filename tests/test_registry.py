"""The registry: registration, duplicates, lookups with suggestions, and plugin discovery."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from cvtasks import create_backbone, list_backbones, register_backbone
from cvtasks.registry import UnknownBackboneError, get_backbone_entry, load_plugins

REPO = Path(__file__).resolve().parents[1]


def test_builtin_plugins_found_through_entry_point_group():
    from importlib.metadata import entry_points

    values = [ep.value for ep in entry_points(group="cvtasks.plugins")]
    assert "plugins" in values
    assert {"resnet18", "resnet50", "vgg16", "vgg16_bn"} <= set(list_backbones())


def test_duplicate_name_is_an_error(monkeypatch: pytest.MonkeyPatch):
    from cvtasks import registry

    load_plugins()
    # the test's net must not outlive it: the backbone table and the sweeps build every registered name
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_backbone("_dup_test_net", family="test")
    class A(nn.Module):
        pass

    with pytest.raises(ValueError, match="already registered"):

        @register_backbone("_dup_test_net", family="test")
        class B(nn.Module):
            pass


def test_unknown_name_suggests_closest_and_make_backbones():
    with pytest.raises(UnknownBackboneError) as err:
        create_backbone("vgg61")
    msg = str(err.value)
    assert "vgg61" in msg and "make backbones" in msg
    assert "vgg16" in msg or "vgg11" in msg


def test_list_backbones_pattern():
    assert list_backbones("resnet1*") == sorted(n for n in list_backbones() if n.startswith("resnet1"))
    assert all("vgg" in n for n in list_backbones("vgg"))
    assert list_backbones("no-such-thing-*") == []


def test_defaults_and_metadata_travel_with_entry():
    entry = get_backbone_entry("resnet50")
    assert entry.family and entry.reference.startswith("torchvision:")


def _run(code: str, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=pythonpath[0])


PLUGIN_SOURCE = '''
from torch import nn
from cvtasks import StagedBackbone, register_backbone
from cvtasks.layers import ConvNormAct


@register_backbone("{name}", family="user", min_input_size=32)
class MyNet(StagedBackbone):
    first_conv = "stages.stem.conv.weight"

    def __init__(self, *, in_chans=3, out_features=None):
        super().__init__()
        self.stages["stem"] = ConvNormAct(in_chans, 8, 3, 2)
        self.stages["s1"] = ConvNormAct(8, 16, 3, 2)
        self._finish([("stem", "c1", 8, 2), ("s1", "c2", 16, 4)], out_features)
'''


def test_new_file_in_plugins_folder_is_picked_up(tmp_path):
    """A file dropped into plugins/ registers with no other edit (run on a copy of the folder)."""
    import shutil

    shutil.copytree(REPO / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "plugins" / "mynet.py").write_text(PLUGIN_SOURCE.format(name="mynet"))
    proc = _run(
        """
        import sys
        # import the packages from the path (the copy of plugins/), not through the editable install
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import plugins, cvtasks
        assert plugins.__file__.startswith(%r), plugins.__file__
        from cvtasks.checks import check_backbone
        report = check_backbone("mynet")
        print(report)
        assert report.ok
        """ % str(tmp_path),
        [tmp_path, REPO],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installed_package_with_entry_point_is_picked_up(tmp_path):
    """A separate distribution declaring `cvtasks.plugins` registers its nets on first lookup."""
    pkg = tmp_path / "thirdparty_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN_SOURCE.format(name="thirdnet"))
    dist = tmp_path / "thirdparty_nets-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-nets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cvtasks.plugins]\nthirdparty = thirdparty_nets\n")
    proc = _run(
        """
        import sys
        from cvtasks import create_backbone, list_backbones
        assert "thirdparty_nets" not in sys.modules
        net = create_backbone("thirdnet", in_chans=1)
        assert "thirdnet" in list_backbones() and "resnet18" in list_backbones()
        print(net.feature_info)
        """,
        [tmp_path],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_broken_plugin_names_itself(tmp_path):
    pkg = tmp_path / "broken_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('boom')\n")
    dist = tmp_path / "broken_nets-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-nets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cvtasks.plugins]\nbroken = broken_nets\n")
    proc = _run("from cvtasks import list_backbones; list_backbones()", [tmp_path])
    assert proc.returncode != 0
    assert "broken_nets" in proc.stderr and "boom" in proc.stderr
