"""kd.footprint: MACs from torch.utils.flop_counter against hand counts, and the measured figures' shape and bounds."""
import json
import time

import pytest
import torch
from torch import nn

from kd import compare, footprint, report
from kd.checkpoint import save_model_file
from kd.models import build_model


def test_macs_of_a_linear_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert footprint.count_macs(model, 4) == 48 * 5  # in x out; the bias add is not a multiply-accumulate


def test_macs_of_a_small_conv_net():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    conv1 = 32 * 32 * 8 * (3 * 3 * 3)  # output positions x output channels x (kernel area x input channels)
    conv2 = 16 * 16 * 16 * (3 * 3 * 8)
    assert footprint.count_macs(model, 32) == conv1 + conv2 + 16 * 10
    assert model.training  # measured in eval mode, given back as it was


def test_macs_count_attention():
    """A ViT's attention is counted: nn.MultiheadAttention's fused inference path, which the flop counter does not
    see, is avoided."""
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=3)
    tokens, d = 16 + 1, 32
    patchify = 16 * d * (8 * 8 * 3)
    layer = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * 64  # qkv, QK^T+AV, out, MLP
    assert footprint.count_macs(vit, 32) == patchify + layer + d * 3


def test_time_forward_is_bounded():
    start = time.perf_counter()
    timing = footprint.time_forward(lambda: time.sleep(0.05), warmup=1, budget_s=0.2)
    assert 0.05 * 1000 <= timing["ms"] < 1000 and 1 <= timing["iters"] <= 6
    assert time.perf_counter() - start < 1.0


def test_measure_a_model_file(tmp_path):
    model = build_model("resnet8", 3)
    path = tmp_path / "model_best.pt"
    save_model_file(path, model.state_dict(), {"arch": "resnet8"})
    figures = footprint.measure(model, 32, path, torch.device("cpu"), budget_s=0.2)
    assert figures["params"] == sum(p.numel() for p in model.parameters()) and figures["macs"] > 10 * figures["params"]
    assert figures["file_bytes"] == path.stat().st_size and figures["weights_bytes"] < figures["file_bytes"]
    cpu = figures["cpu"]
    assert cpu["threads"] == footprint.cpu_threads() and cpu["batch1"]["ms"] > 0 and cpu["batch32"]["img_per_s"] > 0
    assert figures["cuda"] is None  # no GPU here: skipped, not faked
    summary = footprint.summary_values(figures)
    assert summary[footprint.PARAMS] == figures["params"] and footprint.CUDA_B256_MS not in summary
    json.dumps(figures)  # plain JSON for compression.json


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_latency_bf16():
    result = footprint.cuda_latency(build_model("resnet8", 3), 32, torch.device("cuda"), budget_s=0.5)
    assert result["dtype"] == "bfloat16" and result[f"batch{footprint.CUDA_BATCH}"]["ms"] > 0


def test_ratios_and_their_wording():
    teacher = {"params": 3.8e6, "macs": 430e6, "cpu_b1_ms": 31.0, "cpu": "EPYC, 2 threads"}
    student = {"params": 1e6, "macs": 100e6, "cpu_b1_ms": 10.0, "cpu": "EPYC, 2 threads"}
    vs = footprint.ratios(student, teacher)
    assert vs["params_ratio"] == pytest.approx(3.8) and vs["cpu_b1_speedup"] == pytest.approx(3.1)
    assert footprint.tradeoff_line(vs, student["cpu"], -1.2) == (
        "3.8× fewer parameters, 4.3× fewer MACs, 3.1× faster on this CPU (batch 1, EPYC, 2 threads), −1.2 pt top-1")
    elsewhere = footprint.ratios({**student, "cpu": "Xeon, 8 threads"}, teacher)
    assert elsewhere["cpu_b1_speedup"] is None and "latency not compared" in footprint.tradeoff_line(elsewhere, "", 0)


def fake_figures(params, macs, ms):
    return {"params": params, "macs": macs, "image_size": 32, "file_bytes": 4 * params, "cuda": None,
            "cpu": {"device": "EPYC", "threads": 2, "batch1": {"ms": ms}, "batch32": {"ms": 20 * ms}}}


def test_report_shows_the_tradeoff(tmp_path, capsys, monkeypatch):
    """kd.report with compression.json in each run: the ratios against the teacher and tradeoff.png."""
    from test_report import fake_run

    root = tmp_path / "study"
    fake_run(root, "teacher", "teacher", 0, [0.6, 0.7])
    for seed, acc in enumerate((0.55, 0.57)):
        fake_run(root, f"student-s{seed}", "student", seed, [0.5, acc])
        fake_run(root, f"distill-s{seed}", "distill", seed, [0.5, acc + 0.05], 0.1, 4.0, agreement=0.8)
    (root / "teacher" / footprint.FILE).write_text(json.dumps(fake_figures(4_000_000, 800e6, 40.0)))
    for name in ("student-s0", "student-s1", "distill-s0", "distill-s1"):
        (root / name / footprint.FILE).write_text(json.dumps(fake_figures(1_000_000, 200e6, 10.0)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = report.main([str(root), "--no-publish"])
    entries = {e["label"].split(" ")[0]: e for e in summary["tradeoff"]}
    assert entries["distilled"]["vs_teacher"]["params_ratio"] == pytest.approx(4.0)
    assert entries["distilled"]["vs_teacher"]["acc1_delta_pt"] == pytest.approx(100 * (0.61 - 0.7))
    assert entries["teacher"]["vs_teacher"] is None
    markdown = (root / "report" / "report.md").read_text()
    assert "4.0× fewer parameters, 4.0× fewer MACs, 4.0× faster on this CPU (batch 1, EPYC, 2 threads), −9.0 pt" \
        in markdown and "![tradeoff](tradeoff.png)" in markdown
    assert (root / "report" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "What the student costs" not in capsys.readouterr().err


def test_compare_without_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "is not a run output dir" in err


def test_command_measures_a_model_file_and_an_arch(tmp_path, capsys):
    model = build_model("resnet8", 3)
    save_model_file(tmp_path / "model_best.pt", model.state_dict(), {
        "arch": "resnet8", "num_classes": 3, "class_names": ["a", "b", "c"], "image_size": 32, "mean": [0.5] * 3,
        "std": [0.25] * 3})
    results = footprint.main([str(tmp_path), "--arch", "resnet8", "--image-size", "32", "--num-classes", "3",
                              "--budget", "0.1", "--json", "--save"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["arch"] for r in lines] == ["resnet8", "resnet8"] and lines[0]["model"] == str(tmp_path / "model_best.pt")
    assert lines[0]["params"] == lines[1]["params"] == results[1]["params"] and lines[0]["macs"] == lines[1]["macs"]
    saved = json.loads((tmp_path / footprint.FILE).read_text())  # --save: beside the model file, for kd.compare
    assert saved["model"] == "model_best.pt" and saved["params"] == lines[0]["params"]


def test_compare_finds_the_teacher_of_a_distilled_run(tmp_path, capsys):
    """Without a teacher run among the arguments, a distilled run's --teacher-checkpoint dir is the reference;
    latencies from another CPU are not turned into a speed-up."""
    from test_report import fake_run

    fake_run(tmp_path, "teacher", "teacher", 0, [0.6, 0.7])
    fake_run(tmp_path, "distill", "distill", 0, [0.5, 0.65], 0.1, 4.0, agreement=0.8)
    config = json.loads((tmp_path / "distill" / "config.json").read_text())
    config["teacher_checkpoint"] = str(tmp_path / "teacher" / "model_best.pt")
    (tmp_path / "distill" / "config.json").write_text(json.dumps(config))
    (tmp_path / "teacher" / footprint.FILE).write_text(json.dumps(fake_figures(4_000_000, 800e6, 40.0)))
    elsewhere = fake_figures(1_000_000, 200e6, 10.0)
    elsewhere["cpu"]["threads"] = 8
    (tmp_path / "distill" / footprint.FILE).write_text(json.dumps(elsewhere))
    (run,) = compare.main([str(tmp_path / "distill")])
    assert run["vs_teacher"]["teacher"] == str(tmp_path / "teacher") and run["vs_teacher"]["macs_ratio"] == 4.0
    assert run["vs_teacher"]["cpu_b1_speedup"] is None
    assert run["vs_teacher"]["acc1_delta_pt"] == pytest.approx(-5.0)
    assert ("distill vs teacher teacher: 4.0× fewer parameters, 4.0× fewer MACs, latency not compared (measured on "
            "another CPU or thread count), −5.0 pt top-1") in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16"])
def test_macs_match_torchvision_published_numbers(arch):
    """torchvision publishes each model's GFLOPS at 224 px in the multiply-accumulate convention (its `_ops`)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(arch)
    published = torchvision.models.get_model_weights(arch).DEFAULT.meta["_ops"]
    assert footprint.count_macs(model, 224) / 1e9 == pytest.approx(published, abs=5e-4)
