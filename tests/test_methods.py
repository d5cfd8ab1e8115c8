"""Distillation methods (kd.methods): --method kd is the pre-method code path bit for bit; every method trains end
to end on 2 DDP ranks on real JPEGs; FitNet's regressor trains, is checkpointed and resumes exactly after SIGKILL;
the README's own-loop snippet runs."""
import copy
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, run_script, script_env
from kd.checkpoint import TrainState, load_model_file
from kd.engine import Objective, Trainer
from kd.losses import kd_loss_terms, standardize_logits
from kd.methods import DKD, KD, FitNet
from kd.models import build_model
from kd.optim import build_optimizer
from kd.tracking import read_metrics
from wandb_reader import offline_runs, read_run


def test_kd_method_is_the_pre_change_code_path_bit_for_bit():
    """The Trainer's step with Objective(teacher, KD(...)) against the loop kd ran before methods existed (the
    old Objective and train_step, written out): the same weights, bit for bit, with gradient clipping on."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    teacher, init = build_model("resnet8", 5).eval(), build_model("resnet8", 5)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(3)]

    model = copy.deepcopy(init)
    model, optimizer = acc.prepare(model, build_optimizer(model, "sgd", 0.1, 5e-4))
    for images, targets in batches:  # the pre-method path
        logits = model(images)
        with torch.inference_mode(), acc.autocast():
            teacher_logits = teacher(images)
        ce, kd = kd_loss_terms(logits, teacher_logits, targets, 4.0, "batchmean")
        acc.backward(0.3 * ce + 0.7 * kd)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    before = model.state_dict()

    model = copy.deepcopy(init)
    optimizer = build_optimizer(model, "sgd", 0.1, 5e-4)
    model, optimizer = acc.prepare(model, optimizer)
    objective = Objective(teacher, KD(alpha=0.3, temperature=4.0))
    objective.attach(model)
    objective.prepare(acc)
    trainer = Trainer(acc, model, objective, optimizer, None, None, None, None, TrainState(), epochs=1, log_every=1,
                      clip_grad_norm=1.0)
    for images, targets in batches:
        trainer.train_step(images, targets, None, 0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_kd_with_logit_standardization_is_kd_on_standardized_logits():
    torch.manual_seed(1)
    s, t, y = torch.randn(6, 5) * 3, torch.randn(6, 5) * 2 + 1, torch.randint(0, 5, (6,))
    loss, parts = KD(0.2, 2.0, logit_standardize=True)(s, t, y)
    _, kd = kd_loss_terms(standardize_logits(s), standardize_logits(t), y, 2.0)
    assert parts["train/loss_ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())
    assert loss.item() == pytest.approx(0.2 * parts["train/loss_ce"].item() + 0.8 * kd.item())


@pytest.mark.parametrize("flags,temperature", [
    ((), 7.0), (("--logit-standardize",), 2.0), (("--method", "dkd"), 4.0),
    (("--method", "dkd", "--logit-standardize"), 2.0), (("--method", "dist", "--logit-standardize"), 1.0),
    (("--logit-standardize", "--temperature", "4"), 4.0)])
def test_temperature_defaults_to_the_papers(flags, temperature):
    """Each logit method's paper temperature; with logit standardization (unit-spread logits) Sun et al.'s base
    temperature 2 for KD and DKD; a given --temperature always wins."""
    import distill
    from kd.config import validate
    args = distill.build_parser().parse_args(list(flags))
    validate(args)
    assert args.temperature == temperature


def test_dkd_warms_up_linearly_over_epochs():
    torch.manual_seed(2)
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    kd = [DKD(warmup_epochs=4)(s, t, y, epoch=e)[1]["train/loss_kd"].item() for e in range(6)]
    assert kd[0] == pytest.approx(kd[4] / 4) and kd[1] == pytest.approx(kd[4] / 2) and kd[4] == kd[5]


def test_fitnet_regressor_sized_from_both_models_and_trains():
    student, teacher = build_model("resnet8", 3), build_model("resnet8x4", 3).eval()
    method = FitNet.for_models(student, teacher, 32)
    assert method.student_layers == ["layers"] and method.teacher_layers == ["layers"]
    conv = method.regressors[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (64, 256, (1, 1))
    assert {n for n, _ in method.named_parameters()} == {"regressors.0.0.weight", "regressors.0.1.weight",
                                                        "regressors.0.1.bias"}
    tv = FitNet.for_models(build_model("resnet18", 3), build_model("resnet18", 3).eval(), 32)
    assert tv.student_layers == ["layer4"] and tv.teacher_layers == ["layer4"]


def test_teacher_feature_maps_come_from_the_folded_graph():
    """inference_teacher with feature layers: BN folded away, logits and feature maps as the unfolded model's."""
    from kd.compute import inference_teacher
    from kd.features import LOGITS
    for arch, layer in (("resnet8", "layers"), ("resnet18", "layer4")):
        teacher = build_model(arch, 4).eval()
        x = torch.randn(2, 3, 32, 32)
        grabbed = {}
        hook = teacher.get_submodule(layer).register_forward_hook(lambda m, i, o: grabbed.update(f=o))
        with torch.no_grad():
            reference = teacher(x)
        hook.remove()
        fast = inference_teacher(copy.deepcopy(teacher), torch.device("cpu"), torch.float32, True, False, [layer])
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        with torch.no_grad():
            out = fast(x)
        torch.testing.assert_close(out[LOGITS], reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[layer], grabbed["f"], rtol=1e-4, atol=1e-4)


def test_own_loop_snippet_from_the_readme_runs():
    """The README's 'Use a method in your own loop' code blocks, executed as written."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Use a method in your own loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    for code in blocks:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert torch.isfinite(scope["loss"]) and scope["parts"]


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.parametrize("method,flags,parts", [
    ("dkd", ("--logit-standardize",), {"train/loss_tckd", "train/loss_nckd"}),
    ("dist", (), {"train/loss_inter", "train/loss_intra"}),
    ("fitnet", (), set()),
    ("at", ("--feature-layers", "layers.1", "layers"), set()),
])
def test_every_method_on_two_ddp_ranks(teacher_dir, jpeg_folder, tmp_path, method, flags, parts):
    out = tmp_path / method
    proc = run_script("distill.py", *TINY, "--data-dir", jpeg_folder, "--student-arch", "resnet8", "--epochs", "1",
                      "--teacher-checkpoint", teacher_dir, "--method", method, *flags, "--output-dir", out, nproc=2)
    assert f"method: {method}" in proc.stdout and "warning" not in proc.stderr.lower().replace("userwarning", "")
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["num_processes"] == 2
    train = [r for r in read_metrics(out) if "train/loss" in r]
    assert {"train/loss_ce", "train/loss_kd"} | parts <= set(train[0])
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train)
    assert 0 <= read_metrics(out)[-1]["val/agreement"] <= 1
    run = read_run(offline_runs(out)[0])
    assert run["config"]["method"] == method and run["config"]["method_settings"] == config["method_settings"]
    student, meta = load_model_file(out)
    assert meta["method"] == method and meta["config"]["method_settings"] == config["method_settings"]
    assert student.state_dict().keys() == build_model("resnet8", 3).state_dict().keys()  # the student only
    if method == "fitnet":  # the regressor is in the training state, with its optimizer state
        (ckpt,) = (out / "checkpoints").iterdir()
        assert any(p.name.startswith("model_1") for p in ckpt.iterdir())


SYNTH = ("--dataset", "synthetic", "--student-arch", "resnet8", "--batch-size", "64", "--workers", "0",
         "--log-every", "2", "--report-to", "none", "--seed", "5", "--method", "fitnet", "--epochs", "2")


@pytest.fixture(scope="module")
def synthetic_teacher(tmp_path_factory):
    from kd.checkpoint import save_model_file
    from kd.data import build_datasets
    data = build_datasets("synthetic", None, 32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("synthetic-teacher") / "model_best.pt"
    save_model_file(path, build_model("resnet14", 10).state_dict(), {
        "arch": "resnet14", "num_classes": 10, "class_names": data.class_names, "image_size": 32,
        "mean": list(data.mean), "std": list(data.std), "val_acc1": 0.1})
    return path


@pytest.mark.slow
def test_fitnet_sigkill_then_resume_equals_the_uninterrupted_run(synthetic_teacher, tmp_path):
    from test_reliability import assert_same_run, last_step, wait_for
    common = (*SYNTH, "--teacher-checkpoint", synthetic_teacher)
    run_script("distill.py", *common, "--output-dir", tmp_path / "ref")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "distill.py"), *map(str, common), "--output-dir", str(out),
                             "--resume"], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: last_step(out) >= 14, proc)  # 10 steps per epoch: in epoch 2
    proc.kill()
    proc.wait()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]
    proc = run_script("distill.py", *common, "--output-dir", out, "--resume")
    assert "resumed from" in proc.stdout
    assert_same_run(out, tmp_path / "ref")
    from safetensors.torch import load_file
    for name in ("model_1.safetensors",):  # the regressor's final state, as the uninterrupted run's
        a = load_file(out / "checkpoints" / "epoch_0002" / name)
        b = load_file(tmp_path / "ref" / "checkpoints" / "epoch_0002" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_feature_method_with_a_teacher_cache_is_one_error_line(tmp_path, capsys):
    import distill
    with pytest.raises(SystemExit):
        distill.main([*TINY, "--data-format", "packed", "--teacher-cache", str(tmp_path / "c.pt"), "--method", "at",
                      "--output-dir", str(tmp_path / "o"), "--report-to", "none"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--method at distills feature maps" in errors[0]
    assert not (tmp_path / "o" / "config.json").exists()


@pytest.mark.parametrize("arch,layer,folded", [
    ("mobilenet_v3_small", "features", True),  # its squeeze-excitation pools come before the global one
    ("timm:test_convnext", "norm_pre", True), ("timm:resnet10t", "layer4", True), ("resnet20", "layers", True),
    ("tests.model_factories:small_net", "features", False),  # fx cannot trace it: hooks on the eager model
])
def test_default_feature_layer_and_fast_teacher_for_every_family(arch, layer, folded):
    from kd.compute import inference_teacher
    from kd.features import LOGITS, HookedTeacher, last_feature_map
    pytest.importorskip("timm") if arch.startswith("timm:") else None
    model = build_model(arch, 3, image_size=64).eval()
    assert last_feature_map(model, 64) == layer
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        fast = inference_teacher(copy.deepcopy(model), torch.device("cpu"), torch.float32, True, False, [layer])
        out = fast(x)
    assert isinstance(fast, HookedTeacher) != folded and out[layer].ndim == 4
    torch.testing.assert_close(out[LOGITS], reference, rtol=1e-3, atol=1e-3)


def test_a_vit_has_no_default_feature_map_and_says_so():
    from kd.errors import UserError
    from kd.features import last_feature_map
    with pytest.raises(UserError, match="--feature-layers"):
        last_feature_map(build_model("tests.model_factories:tiny_vit", 3, image_size=64), 64)
