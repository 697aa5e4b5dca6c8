"""The generated backbone page and the side-by-side benchmark: what they observe is what they print."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import backbone_docs, backbones, timing
from cvtasks.summary import measure_backbone


def test_counts_use_the_documented_head():
    # the CIFAR WRN's head has 10 classes: 8,949,210 is the paper's 8.9M, as with torchvision-style counting
    assert measure_backbone("wrn40_4")["params"] == 8_949_210
    assert measure_backbone("lenet5")["params"] == 62_006  # 61,706 for grey input, see the registry's note


def test_a_failing_capability_is_a_row_entry_with_its_reason():
    def broken():
        raise ValueError("no | way\nhere")

    assert backbone_docs._try(lambda: None) == "yes"
    assert backbone_docs._try(lambda: "yes (fcn8s)") == "yes (fcn8s)"
    assert backbone_docs._try(broken) == "no (ValueError: no / way here)"  # one line, no table-breaking pipe


def test_observe_and_render_lenet(one_thread):
    row = backbone_docs.observe("lenet5", with_compile=False)
    assert row["params"] == "62,006"
    assert row["published params"].startswith("60,000 (paper")
    assert row["parity"] == "-"  # no reference implementation
    assert row["classification step"] == "yes"
    assert row["segmentation step"] == "yes (deeplabv3)"  # no stride-16 level for FCN-8s
    assert row["detection step"] == "yes (faster_rcnn)"
    assert row["ONNX"] == "yes"  # onnx comes with the Makefile's install (the `export` extra)
    assert row["torch.compile"] == "not run"
    page = backbone_docs.render([row], missing=["vgg16"])
    assert "| lenet5 | lenet | 62,006 | 60,000 (paper" in page
    assert page.count("\n| lenet5 |") == 2  # the size table and the capability matrix
    assert "not observed yet" in page and "vgg16" in page


def test_rows_are_kept_between_runs(tmp_path, one_thread, monkeypatch):
    calls = []

    def fake_observe(name, with_compile):
        calls.append(name)
        return {"name": name, **{k: name for k in ("family", "paper", "reference", "params", "published params", "gflops",
                                                   "native", "levels", "output_stride", "parity", "classification step",
                                                   "segmentation step", "detection step", "channels_last",
                                                   "TorchScript", "ONNX", "torch.compile")}}

    monkeypatch.setattr(backbone_docs, "observe", fake_observe)
    out = tmp_path / "backbones.md"
    backbone_docs.main(["--pattern", "wrn40_4", "--out", str(out)])
    backbone_docs.main(["--pattern", "lenet5", "--out", str(out)])
    assert calls == ["wrn40_4", "lenet5"]
    page = out.read_text()
    assert "| wrn40_4 | wrn40_4 |" in page and "| lenet5 | lenet5 |" in page  # the first run's row survived the second
    assert page.index("| lenet5 |") < page.index("| wrn40_4 |")  # registry order
    assert "not observed yet" in page and "resnet18" in page
    rows = json.loads((tmp_path / "backbones.json").read_text())
    rows["no_such_net"] = rows["wrn40_4"]
    (tmp_path / "backbones.json").write_text(json.dumps(rows))
    backbone_docs.main(["--pattern", "lenet5", "--out", str(out)])
    assert "no_such_net" not in out.read_text()  # rows of unregistered names are dropped


@pytest.mark.parametrize("name,size", [("lenet5", 32), ("vgg11", 32), ("mobilenet_v2", 32), ("wrn40_4", 32)])
def test_torchscript_compiles_the_nets(name, size, one_thread):
    # the input-size check, the head's feature dict and class-level attributes all used to stop the compiler
    assert backbone_docs._try(lambda: backbone_docs._torchscript(name, size)) == "yes"


def test_reference_count_is_observed(one_thread):
    from cvtasks.registry import get_backbone_entry

    assert backbone_docs._published(get_backbone_entry("alexnet")) == "61,100,840 (torchvision)"
    assert backbone_docs._published(get_backbone_entry("wrn28_10")) == "36.5M (paper, Table 4)"


def test_bench_pair_reports_a_ratio(one_thread):
    assert backbones.bench_backbone("lenet5", size=32, batch=1, repeats=1) is None  # nothing to compare with
    r = backbones.bench_backbone("alexnet", size=95, batch=1, repeats=1)
    assert r["reference"] == "torchvision:alexnet" and r["size"] == 95
    assert r["ratio"] == pytest.approx(r["ours_s"] / r["ref_s"]) and r["ratio"] > 0


def test_interleaved_runs_each_side_alike():
    calls: list[str] = []
    ta, tb = timing.interleaved(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert ta >= 0 and tb >= 0


def test_segmentation_ceiling_falls_with_the_stride():
    from benchmarks.segmentation_ceiling import ceiling

    exact, per_class = ceiling(32, 1, scenes=4)
    assert exact == pytest.approx(1.0) and len(per_class) == 6
    coarse, _ = ceiling(32, 8, scenes=4)
    finer, _ = ceiling(64, 8, scenes=4)  # same scenes, twice the pixels per shape
    assert coarse < finer < 1.0


def test_data_benchmark_measures_each_loader_and_the_folder_pipelines(one_thread, tmp_path):
    from benchmarks import data

    out = data.main(["--tasks", "classification", "--samples", "24", "--folder-images", "8", "--folder-side", "48",
                     "--folder-size", "32", "--repeats", "1", "--no-steps"])
    rates = out["loaders"]["classification"]
    assert rates["img_size"] == 64 and rates["first_epoch"] > 0 and rates["later_epochs"] > 0
    assert out["folder"]["ratio"] == pytest.approx(out["folder"]["ours_ms"] / out["folder"]["torchvision_ms"])
    # the two folder pipelines do the same work: same labels, same sizes, the same pictures (flips aside)
    root = data.write_jpeg_folder(tmp_path / "jpegs", 4, 48)
    ours, theirs = data._OurFolder(root, 32), data._TorchvisionFolder(root, 32)
    for i in range(4):
        (a, la), (b, lb) = ours[i], theirs[i]
        assert la == lb and a.shape == b.shape == (3, 32, 32)
        assert torch.allclose(a.mean(dim=(1, 2)), b.mean(dim=(1, 2)), atol=0.05)  # flip-invariant


def test_step_ratio_times_a_real_loader_against_a_fixed_batch(one_thread, monkeypatch):
    from benchmarks import data

    real_default_data = data.default_data
    monkeypatch.setattr(data, "default_data", lambda task, **kw: real_default_data(task, **{"num_samples": 40, **kw}))
    real, fixed, workers = data.step_ratio("classification", steps=1, repeats=1)
    assert real > 0 and fixed > 0 and workers >= 0


def test_throughput_benchmark_runs_on_a_cpu(one_thread):
    from benchmarks import throughput

    out = throughput.main(["--device", "cpu", "--backbone", "_tinynet", "--size", "32", "--batch", "4", "--steps", "2",
                           "--images", "16", "--workers", "0", "--precision", "32"])
    assert out["real"] > 0 and out["fixed"] > 0 and out["device"] == "cpu"
