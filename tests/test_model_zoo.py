"""Any model as teacher or student: torchvision's zoo, timm:<name>, package.module:callable (kd.models)."""
import copy
import subprocess
import sys

import pytest
import torch
import torchvision

from conftest import REPO, run_script, script_env, traceback_from_kd
from kd.checkpoint import load_model_file, save_model_file
from kd.compute import inference_teacher, renormalized
from kd.errors import UserError
from kd.models import build_model, input_normalization

timm = pytest.importorskip("timm")

# One model per family, each built at 64 px: (arch, what it exercises)
FAMILIES = [
    ("mobilenet_v3_small", "torchvision CNN with squeeze-excitation blocks, classifier at classifier.3"),
    ("tests.model_factories:tiny_vit", "torchvision's VisionTransformer from a user factory (LayerNorm, attention)"),
    ("timm:test_convnext", "a ConvNeXt (LayerNorm2d, layer scale), timm"),
    ("timm:test_vit", "a timm ViT, fixed-size: built at img_size=64"),
    ("timm:resnet10t", "a timm CNN with batch norm"),
    ("tests.model_factories:small_net", "a user module fx cannot trace"),
    ("resnet20", "a CIFAR ResNet"),
]


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Weights and batch-norm statistics away from their init (zero heads, unit BN), so that a folding or casting
    mistake shows in the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.numel() > 1:
                noise = torch.randn(tensor.shape, generator=g)
                spread = max(tensor.std().item(), 0.02)
                tensor.copy_(noise.abs() * 0.5 + 0.5 if "running_var" in name else tensor + 0.3 * spread * noise)
    return model.eval()


def meta_for(arch, model, num_classes=3, image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    return {"arch": arch, "model": model.kd_spec, "head": "linear", "num_classes": num_classes,
            "class_names": ["cat", "dog", "fox"][:num_classes], "image_size": image_size, "mean": list(mean),
            "std": list(std)}


@pytest.mark.parametrize("arch", [a for a, _ in FAMILIES])
def test_family_builds_at_64px_and_round_trips_a_model_file(arch, tmp_path):
    model = randomize(build_model(arch, 3, image_size=64))
    x = torch.randn(2, 3, 64, 64)
    save_model_file(tmp_path / "m.pt", model.state_dict(), meta_for(arch, model))
    loaded, meta = load_model_file(tmp_path / "m.pt")
    assert meta["model"]["source"] in ("torchvision", "timm", "user", "cifar")
    with torch.no_grad():
        assert loaded(x).shape == (2, 3)
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("arch", [a for a, _ in FAMILIES])
def test_inference_teacher_equals_eager(arch):
    """fp32: BN folding where the model traces is exact up to float reassociation (<= 1e-4 of the logits' scale).
    bf16: the weights cast once give what eager autocast computes, up to bf16 rounding of the folded weights
    (<= 3e-2 of the scale, bf16 has 8 mantissa bits)."""
    model = randomize(build_model(arch, 3, image_size=64))
    x = torch.randn(4, 3, 64, 64)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        fast = inference_teacher(copy.deepcopy(model), torch.device("cpu"), dtype, channels_last=True, compile=False)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            ref, got = model(x).float(), fast(x.contiguous(memory_format=torch.channels_last)).float()
        scale = ref.abs().max().item()
        assert scale > 1e-3
        assert (ref - got).abs().max().item() <= tolerance * scale, (arch, dtype)
    traced = isinstance(inference_teacher(copy.deepcopy(model), torch.device("cpu"), torch.float32, True, False),
                        torch.fx.GraphModule)
    # The user module's shape test and timm test_vit's position-embedding resampling cannot be traced: eager.
    assert traced == (arch not in ("tests.model_factories:small_net", "timm:test_vit"))
    if arch in ("mobilenet_v3_small", "timm:resnet10t", "resnet20"):
        folded = inference_teacher(copy.deepcopy(model), torch.device("cpu"), torch.float32, True, False)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_generic_head_and_freeze_for_every_family():
    for arch, head_name in (("mobilenet_v3_small", "classifier.3"), ("tests.model_factories:tiny_vit", "heads.head"),
                            ("timm:test_convnext", "head.fc"), ("timm:test_vit", "head"),
                            ("tests.model_factories:small_net", "classifier")):
        model = build_model(arch, 5, head="mlp-student", freeze_backbone=True, image_size=64)
        head = model.get_submodule(head_name)
        assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [128, 128, 5], arch
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith(head_name + ".") for n in trainable), arch
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_fixed_size_models_are_built_at_the_image_size():
    assert build_model("vit_b_32", 3, image_size=64).image_size == 64
    assert build_model("timm:test_vit", 3, image_size=96).patch_embed.img_size == (96, 96)
    assert build_model("swin_t", 3, image_size=64).kd_spec["kwargs"] == {}  # any size works


def test_weights_from_local_files_drop_a_classifier_of_another_class_count(tmp_path):
    """--weights: a torchvision state dict (.pth, saved from DDP: module. prefix), a timm .safetensors file, and
    a kd model file; the 1000-class classifier is left as built for 3 classes, the rest is loaded."""
    from safetensors.torch import save_file

    reference = randomize(torchvision.models.mobilenet_v3_small())
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "mnv3.pth")
    model = build_model("mobilenet_v3_small", 3, weights=str(tmp_path / "mnv3.pth"))
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    assert model.classifier[3].out_features == 3
    assert model.kd_normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    vit = randomize(timm.create_model("test_vit", img_size=64))
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    model = build_model("timm:test_vit", 3, weights=str(tmp_path / "vit.safetensors"), image_size=64)
    assert torch.equal(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert model.kd_normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's pretrained_cfg
    assert input_normalization("timm:test_vit", weights=str(tmp_path / "vit.safetensors")) == model.kd_normalization
    assert input_normalization("timm:test_vit") is None  # from scratch: the dataset's

    save_model_file(tmp_path / "kd.pt", model.state_dict(), meta_for("timm:test_vit", model, mean=(0.1,) * 3))
    again = build_model("timm:test_vit", 3, weights=str(tmp_path / "kd.pt"), image_size=64, pretrained=True)  # no download
    assert torch.equal(again.head.weight, model.head.weight) and again.kd_normalization[0] == (0.1,) * 3

    with pytest.raises(UserError, match="does not fit"):
        build_model("resnet18", 3, weights=str(tmp_path / "mnv3.pth"))


def test_renormalized_teacher_sees_the_same_crop_its_own_way():
    pixels = torch.rand(2, 3, 8, 8)
    student_norm, teacher_norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)
    norm = lambda x, n: (x - torch.tensor(n[0]).view(1, 3, 1, 1)) / torch.tensor(n[1]).view(1, 3, 1, 1)  # noqa: E731
    seen = []
    teacher = renormalized(lambda x: seen.append(x) or x, student_norm, teacher_norm)
    teacher(norm(pixels, student_norm))
    torch.testing.assert_close(seen[0], norm(pixels, teacher_norm), rtol=0, atol=1e-5)
    model = torch.nn.Identity()
    assert renormalized(model, student_norm, student_norm) is model


def test_unknown_names_and_bad_factories_are_one_line_each():
    with pytest.raises(UserError, match=r"unknown architecture 'mobilenet_v3_smal': did you mean mobilenet_v3_small"):
        build_model("mobilenet_v3_smal", 3)
    with pytest.raises(UserError, match=r"unknown architecture 'timm:resnet10': did you mean timm:resnet10t"):
        build_model("timm:resnet10", 3)
    with pytest.raises(UserError, match=r"cannot import no_such_pkg.models .* PYTHONPATH"):
        build_model("no_such_pkg.models:net", 3)
    with pytest.raises(UserError, match=r"tests.model_factories has no callable 'nope'"):
        build_model("tests.model_factories:nope", 3)
    with pytest.raises(UserError, match=r"returned a str, not a torch.nn.Module"):
        build_model("tests.model_factories:not_a_model", 3)
    with pytest.raises(UserError, match=r"--head mlp-student: the classifier classifier.1 .* Conv2d"):
        build_model("squeezenet1_1", 3, head="mlp-student")


def test_missing_timm_is_one_line_naming_the_extra():
    """timm hidden from the import system, as on an install without the extra."""
    code = ("import sys; sys.modules['timm'] = None\n"
            "from kd.models import build_model\n"
            "build_model('timm:resnet10t', 3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=script_env())
    assert "timm:resnet10t needs timm, which is not installed: pip install -e '.[timm]'" in proc.stderr


def test_model_file_of_an_unimportable_factory_is_one_line(tmp_path):
    model = build_model("tests.model_factories:small_net", 3)
    meta = meta_for("tests.model_factories:small_net", model)
    meta["model"] = {**meta["model"], "name": "gone_pkg.nets:small_net"}
    save_model_file(tmp_path / "m.pt", model.state_dict(), {**meta, "arch": "gone_pkg.nets:small_net"})
    with pytest.raises(UserError, match=r"m.pt: cannot rebuild its model: cannot import gone_pkg.nets"):
        load_model_file(tmp_path / "m.pt")


def test_pretrained_timm_offline_says_what_to_download(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline, raising=False)
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_url", offline, raising=False)
    monkeypatch.setattr("timm.models._builder.download_cached_file", offline, raising=False)
    with pytest.raises(UserError, match=r"could not download pretrained timm:resnet10t .*huggingface.co/timm/resnet10t"
                                        r".* --weights FILE"):
        build_model("timm:resnet10t", 3, pretrained=True)


# ---------------------------------------------------------------- end to end, on real JPEGs at 64 px
E2E = ("--dataset", "imagefolder", "--image-size", "64", "--batch-size", "8", "--workers", "0", "--epochs", "1",
       "--log-every", "2", "--report-to", "none", "--warmup-epochs", "0.5")


@pytest.fixture(scope="module")
def vit_teacher(jpeg_folder, tmp_path_factory):
    """timm:test_vit trained 1 epoch from a local .safetensors file: its model file records (0.5, 0.5, 0.5)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vit_teacher")
    save_file(timm.create_model("test_vit", img_size=64).state_dict(), str(root / "vit.safetensors"))
    out = root / "run"
    run_script("train_teacher.py", *E2E, "--data-dir", jpeg_folder, "--arch", "timm:test_vit", "--weights",
               root / "vit.safetensors", "--output-dir", out, "--lr", "0.01")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "tests.model_factories:tiny_vit", "timm:test_convnext"])
def test_train_each_family_end_to_end(arch, jpeg_folder, tmp_path):
    """A torchvision CNN with SE blocks, torchvision's ViT from a user factory, a timm ConvNeXt; a timm ViT trains
    in the vit_teacher fixture and timm:resnet10t is the cached run's student."""
    run_script("train_teacher.py", *E2E, "--data-dir", jpeg_folder, "--arch", arch, "--output-dir", tmp_path,
               "--lr", "0.01")
    model, meta = load_model_file(tmp_path)
    assert meta["arch"] == arch and meta["model"]["source"] in ("torchvision", "user", "timm")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.slow
def test_vit_teacher_into_resnet_student_on_two_ranks(vit_teacher, jpeg_folder, tmp_path):
    """Teacher (0.5, 0.5, 0.5) and student (ImageNet statistics) normalize differently: the teacher's accuracy
    on the student's batches is the one it had at training time, so it sees its own normalization."""
    teacher_acc = load_model_file(vit_teacher)[1]["val_acc1"]
    proc = run_script("distill.py", *E2E, "--data-dir", jpeg_folder, "--teacher-checkpoint", vit_teacher,
                      "--student-arch", "resnet18", "--output-dir", tmp_path, nproc=2)
    assert f"teacher val top-1: {teacher_acc:.4f}" in proc.stdout
    assert "input mean [0.5, 0.5, 0.5]" in proc.stdout and "student's mean [0.485, 0.456, 0.406]" in proc.stdout
    _, meta = load_model_file(tmp_path)
    assert meta["arch"] == "resnet18" and meta["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_teacher_cache_built_by_a_vit_teacher(vit_teacher, jpeg_folder, tmp_path):
    """The cache renders each view with the teacher's normalization; the student replays it with its own."""
    env = script_env(KD_DATA_CACHE=str(tmp_path / "cache"))
    cache = tmp_path / "vit-cache.pt"
    subprocess.run([sys.executable, "-m", "kd.teacher_cache", "build", "--teacher-checkpoint", str(vit_teacher),
                    "--data-dir", str(jpeg_folder), "--image-size", "64", "--views", "2", "--out", str(cache),
                    "--mixed-precision", "no", "--batch-size", "16"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    from kd.teacher_cache import TeacherCache
    loaded = TeacherCache.load(cache)
    assert loaded.meta["mean"] == [0.5, 0.5, 0.5] and loaded.meta["teacher"]["arch"] == "timm:test_vit"
    assert loaded.meta["teacher"]["val_acc1"] == load_model_file(vit_teacher)[1]["val_acc1"]
    proc = run_script("distill.py", *E2E, "--data-dir", jpeg_folder, "--data-format", "packed", "--teacher-cache",
                      cache, "--teacher-checkpoint", vit_teacher, "--student-arch", "timm:resnet10t",
                      "--output-dir", tmp_path / "run", env=env)
    assert "teacher: timm:test_vit logits for 2 views" in proc.stdout


@pytest.mark.slow
def test_fixed_size_teacher_at_another_size_and_unknown_student_are_one_line(vit_teacher, jpeg_folder, tmp_path):
    proc = run_script("distill.py", *E2E[:2], "--image-size", "96", *E2E[4:], "--data-dir", jpeg_folder,
                      "--teacher-checkpoint", vit_teacher, "--output-dir", tmp_path / "a", check=False)
    assert proc.returncode != 0 and "built for 64 px inputs" in proc.stderr and not traceback_from_kd(proc.stderr)
    proc = run_script("distill.py", *E2E, "--data-dir", jpeg_folder, "--teacher-checkpoint", vit_teacher,
                      "--student-arch", "mobilenetv3", "--output-dir", tmp_path / "b", check=False)
    assert proc.returncode != 0 and "error: unknown architecture 'mobilenetv3'" in proc.stderr
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_bench_takes_any_names_and_measures_the_inference_teacher():
    from test_bench import bench

    lines = bench("--synthetic", "--teacher", "timm:test_convnext", "--student", "mobilenet_v3_small", "--mode",
                  "teacher-infer", "student", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup",
                  "1", "--threads", "1")
    assert [line["mode"] for line in lines] == ["teacher-infer", "student", "summary"]
    assert lines[0]["teacher"] == "timm:test_convnext" and lines[0]["speedup"] > 0 and lines[0]["traced"]
