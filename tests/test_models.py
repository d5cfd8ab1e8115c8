import copy

import pytest
import torch
import torchvision

from kd.checkpoint import load_model_file, save_model_file
from kd.errors import UserError
from kd.models import CIFAR_ARCHS, build_model
from kd.optim import EpochSchedule, build_optimizer, is_fused, param_groups


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet20", 32), ("resnet8x4", 32), ("resnet56", 32)])
def test_output_shape(arch, size):
    model = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_all_cifar_and_torchvision_resnets_build():
    for arch in [*CIFAR_ARCHS, "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]:
        assert sum(p.numel() for p in build_model(arch, 10).parameters()) > 0


def test_cifar_depths_and_widths():
    def convs(m):
        return sum(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())
    assert convs(build_model("resnet20", 10)) + 1 == 20  # 19 3x3 convs + fc
    assert convs(build_model("resnet56", 10)) + 1 == 56
    assert build_model("resnet32x4", 100).fc.in_features == 256


def test_unknown_arch_is_user_error():
    with pytest.raises(UserError, match="unknown architecture 'resnet9000'"):
        build_model("resnet9000", 10)


def test_pretrained_without_network_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match=r"could not load pretrained resnet18 weights .* put the file in"):
        build_model("resnet18", 10, pretrained=True)


def test_pretrained_uses_torchvision_weights(monkeypatch, tmp_path):
    """With the weights file in the hub cache (as after one online run) they load and the head is replaced."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    reference = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    model = build_model("resnet18", 10, pretrained=True)
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_no_weight_decay_on_norms_and_biases():
    model = build_model("resnet20", 10)
    decay, no_decay = param_groups(model, 5e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    """Per step of 1/20 epoch: the old step-count schedule's values (warmup 4 steps, cosine to step 20)."""
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "sgd", lr=1.0, weight_decay=0.0)
    sched = EpochSchedule(opt, 1.0, warmup_epochs=0.2, epochs=1.0)
    lrs = []
    for k in range(20):
        sched.at(k / 20, (k + 1) / 20)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[12] == pytest.approx(0.5) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    # a segment added by an extension: from epoch 1 (where the first curve ended) a restart at 0.5 x peak
    sched = EpochSchedule(opt, 1.0, 0.2, 1.0, segments=[{"start": 1.0, "end": 3.0, "factor": 0.5}])
    assert sched.factor(0.6, 0.65) == pytest.approx(lrs[12]) and sched.factor(1.0, 1.1) == pytest.approx(0.5)
    assert sched.factor(2.0, 2.1) == pytest.approx(0.25) and sched.factor(3.0, 3.1) == pytest.approx(0.0)


def test_adamw_and_nesterov():
    model = torch.nn.Linear(2, 2)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.05), torch.optim.AdamW)
    sgd = build_optimizer(model, "sgd", 0.1, 0.0, momentum=0.9, nesterov=True)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fused_optimizer_where_available_same_updates(opt):
    """Fused on cpu/cuda, torch's default elsewhere; the fused kernel computes the same update as the for-loop."""
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    reference = copy.deepcopy(model)
    fused = build_optimizer(model, opt, 0.1, 5e-4, device="cpu")
    assert is_fused(fused) and not is_fused(build_optimizer(model, opt, 0.1, 5e-4, device="mps"))
    groups = param_groups(reference, 5e-4)
    plain = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, foreach=False) if opt == "sgd"
             else torch.optim.AdamW(groups, lr=0.1, foreach=False))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        for m, o in ((model, fused), (reference, plain)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same maths, other rounding


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_state_from_another_implementation_stays_fused(opt):
    """A checkpoint of a non-fused optimizer (an older kd) resumed: still fused, and fp16 loss scaling works."""
    model = build_model("resnet8", 10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    groups = param_groups(model, 5e-4)
    old = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True) if opt == "sgd"
           else torch.optim.AdamW(groups, lr=0.1))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    old.step()
    optimizer = build_optimizer(model, opt, 0.1, 5e-4, device="cpu")
    optimizer.load_state_dict(old.state_dict())
    assert is_fused(optimizer)
    scaler = torch.amp.GradScaler("cpu")
    optimizer.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    scaler.update()


def test_model_file_round_trip(tmp_path):
    model = build_model("resnet8", 3)
    meta = {"arch": "resnet8", "num_classes": 3, "class_names": ["a", "b", "c"], "image_size": 32,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    save_model_file(tmp_path / "m.pt", model.state_dict(), meta)
    loaded, loaded_meta = load_model_file(tmp_path / "m.pt")
    assert loaded_meta == meta and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_reference_heads_on_a_frozen_backbone(tmp_path):
    """The reference experiment's setting (--pretrained --freeze-backbone --head mlp-teacher/mlp-student), built
    here without weights: only the head trains, and the model file rebuilds the same head."""
    teacher = build_model("resnet101", 10, head="mlp-teacher", freeze_backbone=True)
    layers = [type(m).__name__ for m in teacher.fc]
    assert layers == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert teacher.fc[0].p == 0.95 and teacher.fc[1].in_features == 2048 and teacher.fc[4].out_features == 2048
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fc.") for n in trainable)
    student = build_model("resnet18", 10, head="mlp-student", freeze_backbone=True)
    assert [m.out_features for m in student.fc if isinstance(m, torch.nn.Linear)] == [128, 128, 10]
    groups = param_groups(student, 5e-4)
    assert sum(len(g["params"]) for g in groups) == 6  # three Linear layers: weights and biases only
    meta = {"arch": "resnet18", "head": "mlp-student", "num_classes": 10, "class_names": list("abcdefghij"),
            "image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_model_file(tmp_path / "s.pt", student.state_dict(), meta)
    loaded, _ = load_model_file(tmp_path / "s.pt")
    assert isinstance(loaded.fc, torch.nn.Sequential) and len(loaded.fc) == 5
    with pytest.raises(UserError, match="unknown head"):
        build_model("resnet18", 10, head="mlp")
