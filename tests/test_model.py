"""Models: preprocessing inside, heads, backbones by name, weights from a local file."""
import numpy as np
import pytest

import keras

from kfine.config import HeadConfig, ModelConfig, ScratchConfig
from kfine.model import BACKBONES, ModelError, build_model, get_backbone, probabilities, weights_info


def test_preprocessing_inside_matches_keras_preprocess_input():
    model = build_model(ModelConfig(weights=None), 3, (32, 32))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    inside = model.get_layer("preprocess")(x)
    ref = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(inside), ref, atol=1e-4)
    logits = model.predict(x, verbose=0)
    assert logits.dtype == np.float32 and logits.shape == (2, 3)
    probs = keras.ops.convert_to_numpy(probabilities(model, x))
    assert probs.dtype == np.float32 and probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, keras.ops.convert_to_numpy(keras.ops.softmax(logits)), rtol=1e-5)


def test_mlp_head_like_vlg50():
    cfg = ModelConfig(weights=None, head=HeadConfig(type="mlp", units=(512,), activation="relu", dropout=0.5))
    model = build_model(cfg, 50, (32, 32))
    assert model.get_layer("head_dense0").units == 512
    assert model.get_layer("head_dropout0").rate == 0.5
    assert model.get_layer("head_logits").units == 50


@pytest.mark.parametrize("name", ["resnet101", "efficientnetb0", "mobilenetv2"])
def test_other_backbones_build(name):
    model = build_model(ModelConfig(backbone=name, weights=None), 4, (32, 32))
    assert model.output_shape == (None, 4)


def test_scratch_cnn_is_configurable():
    cfg = ModelConfig(backbone="scratch_cnn", weights=None,
                      scratch=ScratchConfig(filters=(8, 8, 16, 16, 32), kernel_size=5, activation="gelu",
                                            batchnorm=True, dense_units=64, dropout=0.3))
    model = build_model(cfg, 10, (32, 32))
    bb = get_backbone(model)
    convs = [l for l in bb.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 8, 16, 16, 32] and convs[0].kernel_size == (5, 5)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in bb.layers) == 5
    assert sum(isinstance(l, keras.layers.MaxPooling2D) for l in bb.layers) == 5
    assert bb.get_layer("block1_act").activation.__name__ == "gelu"
    assert model.get_layer("head_dense0").units == 64 and model.get_layer("head_dropout0").rate == 0.3


def test_weights_from_local_file(tmp_path):
    keras.utils.set_random_seed(1)
    src = build_model(ModelConfig(weights=None), 3, (32, 32))
    path = tmp_path / "resnet50.weights.h5"
    get_backbone(src).save_weights(path)
    keras.utils.set_random_seed(2)
    loaded = build_model(ModelConfig(weights=str(path)), 3, (32, 32))
    a = get_backbone(src).get_layer("conv3_block2_2_conv").kernel.numpy()
    b = get_backbone(loaded).get_layer("conv3_block2_2_conv").kernel.numpy()
    np.testing.assert_array_equal(a, b)
    assert weights_info(loaded) == {"used": str(path), "note": ""}
    assert weights_info(src)["used"] == "random"


def test_weights_that_do_not_fit(tmp_path):
    other = build_model(ModelConfig(backbone="mobilenetv2", weights=None), 3, (32, 32))
    path = tmp_path / "mobilenet.weights.h5"
    get_backbone(other).save_weights(path)
    with pytest.raises(ModelError, match="does not fit backbone resnet50"):
        build_model(ModelConfig(weights=str(path)), 3, (32, 32))
    with pytest.raises(ModelError, match="does not exist"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.weights.h5")), 3, (32, 32))


def test_imagenet_offline(capsys):
    """Downloads are blocked in tests (conftest): without a fallback the error says where to put
    the file; with weights_fallback: random it says so in one line and goes on."""
    with pytest.raises(ModelError) as e:
        build_model(ModelConfig(weights="imagenet"), 3, (32, 32))
    assert "~/.keras/models/" in str(e.value) and "model.weights" in str(e.value)
    model = build_model(ModelConfig(weights="imagenet", weights_fallback="random"), 3, (32, 32))
    out = capsys.readouterr().out
    assert "random initialisation" in out and len(out.strip().splitlines()) == 1
    assert model.output_shape == (None, 3)
    info = weights_info(model)          # what run_info.json and the report state: not "imagenet"
    assert info["used"] == "random" and "weights_fallback: random" in info["note"]
    scratch = build_model(ModelConfig(backbone="scratch_cnn", weights="imagenet"), 3, (32, 32))
    assert weights_info(scratch)["used"] == "random"       # scratch_cnn ignores model.weights


def test_imagenet_download_tried_once_per_process_and_silent(monkeypatch, capsys):
    """weights_fallback: random: the download is tried once per process (a comparison builds the
    backbone per run), Keras' own "Downloading data from" line is not printed, and kfine's one
    line carries the whole error, as run_info.json's note does."""
    import keras.src.utils.file_utils as fu
    import kfine.model as km
    monkeypatch.setattr(km, "_FAILED_DOWNLOADS", {}, raising=False)
    error = ("URL fetch failure on https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5: None -- [Errno -3] Temporary failure "
             "in name resolution")
    calls = []

    def offline(fname=None, origin=None, *args, **kwargs):
        calls.append(origin)
        print(f"Downloading data from {origin}")   # as Keras' get_file does before it fails
        raise Exception(error)
    monkeypatch.setattr(fu, "get_file", offline)
    cfg = ModelConfig(weights="imagenet", weights_fallback="random")
    first = build_model(cfg, 3, (32, 32))
    second = build_model(cfg, 3, (32, 32))
    out = capsys.readouterr().out
    assert len(calls) == 1
    assert "Downloading data from" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(l.startswith("kfine: ImageNet weights for resnet50") for l in lines)
    assert error in lines[0] and "continuing from random initialisation" in lines[0]
    for m in (first, second):
        assert weights_info(m)["used"] == "random" and error in weights_info(m)["note"]
    with pytest.raises(ModelError, match="Temporary failure in name resolution"):   # no fallback: no new try
        build_model(ModelConfig(weights="imagenet"), 3, (32, 32))
    assert len(calls) == 1


def test_unknown_backbone_and_head():
    with pytest.raises(ModelError, match="resnet50"):
        build_model(ModelConfig(backbone="resnet9000", weights=None), 3, (32, 32))
    with pytest.raises(ModelError, match="linear"):
        build_model(ModelConfig(weights=None, head=HeadConfig(type="transformer")), 3, (32, 32))
    assert "resnet50" in BACKBONES and "scratch_cnn" in BACKBONES


def test_dry_run_sizes_the_head_from_the_class_folders(tmp_path, monkeypatch, capsys):
    """kfine.train --dry-run reads the class count from the data folder's class folder names (no
    image listed or decoded); --num-classes N overrides it; --num-classes without --dry-run is a
    usage error."""
    import kfine.sources as sources
    import kfine.train as train
    from conftest import make_folder
    root = make_folder(tmp_path / "data", "inat", classes=("a", "b", "c", "d"), per_class=1)
    for name in ("scan_files", "index_folder", "find_folder"):
        monkeypatch.setattr(sources, name, lambda *a, **k: pytest.fail("the dry run read the data"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: d\ndata: {{root: {root}, image_size: [32, 32]}}\nmodel: {{weights: null, backbone: "
                   f"scratch_cnn, scratch: {{filters: [4, 4, 4, 4, 4], dense_units: 8}}}}\ntrain: {{epochs: 2}}\n")
    assert train.main(["--dry-run", "--config", str(cfg), f"runs_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "head for 4 classes" in out and f"class folders in {root}" in out
    assert "phase 0 (epochs 1..2 of 2)" in out
    assert train.main(["--dry-run", "--num-classes", "7", "--config", str(cfg)]) == 0
    assert "head for 7 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        train.main(["--num-classes", "7", "--config", str(cfg)])
    assert e.value.code == 2 and "--num-classes goes with --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- stages
# One variant per keras.applications family (its smallest) is built in the default run; every other
# registered backbone in the slow run. Each model is built for its test, at its minimum size.
SMALLEST = ["convnext_tiny", "densenet121", "efficientnetb0", "efficientnetv2_b0", "inception_resnet_v2",
            "inception_v3", "mobilenet", "mobilenetv2", "mobilenet_v3_small", "nasnet_mobile", "resnet50",
            "resnet50v2", "vgg16", "vgg19", "xception", "scratch_cnn", "toy_resnet"]
OTHERS = sorted(set(BACKBONES) - set(SMALLEST))


def backbone(name, structure_only=False):
    """A registered backbone's model (weights=None, its minimum size >= 32 px), built for the one
    test that reads it. ``structure_only``: built in a keras.StatelessScope that never runs the
    variables' initialisers (EfficientNetV2L builds in 2 s instead of 8.5): layers and their
    variables, no values, for the tests that read the structure only. Keras keeps such variables
    in a global list that the next StatelessScope to close initialises (any later model build in
    the worker: 30 s for this module's ~55 models); the list is emptied here."""
    import keras
    from keras.src.backend.common import global_state
    from kfine.config import ScratchConfig
    from kfine.registry import min_input_size
    size = max(32, min_input_size(name))
    cfg = ModelConfig(backbone=name, weights=None, scratch=ScratchConfig(filters=(4, 4, 8, 8, 8), batchnorm=True))
    if not structure_only:
        return build_model(cfg, 3, (size, size))
    with keras.StatelessScope(initialize_variables=False):
        model = build_model(cfg, 3, (size, size))
    global_state.set_global_attribute("uninitialized_variables", [])
    return model


_KERAS_MODULE = {"ConvNeXt": "convnext", "DenseNet": "densenet", "EfficientNetV2": "efficientnet_v2",
                 "EfficientNet": "efficientnet", "InceptionResNetV2": "inception_resnet_v2",
                 "InceptionV3": "inception_v3", "MobileNetV2": "mobilenet_v2", "MobileNetV3": "mobilenet_v3",
                 "MobileNet": "mobilenet", "NASNet": "nasnet", "ResNet50V2": "resnet_v2", "ResNet101V2": "resnet_v2",
                 "ResNet152V2": "resnet_v2", "ResNet": "resnet", "VGG16": "vgg16", "VGG19": "vgg19",
                 "Xception": "xception"}


def keras_module(name):
    """The keras.applications module of a registered backbone (its family); None for scratch_cnn."""
    app = BACKBONES[name]["app"]
    return next((m for prefix, m in _KERAS_MODULE.items() if app.startswith(prefix)), "?") if app else None


def test_every_family_is_covered_by_the_fast_list():
    """Each keras.applications family (module) has its smallest variant in SMALLEST."""
    family = keras_module
    assert "?" not in {family(n) for n in BACKBONES}
    assert {family(n) for n in SMALLEST} == {family(n) for n in BACKBONES}
    assert set(SMALLEST) <= set(BACKBONES)


def check_stages(model, name):
    """Every layer of the backbone is in a stage that holds weights (one a freeze spec or a
    multiplier can name), stages follow the layer order, and the registry's static stage tuple is
    the ordered set of stages of the weight-carrying layers; BatchNorm, preprocessing and the
    minimum size are what the registry says."""
    import keras
    from kfine.model import layer_stages
    from kfine.registry import has_batchnorm, stage_names
    bb = get_backbone(model)
    of = layer_stages(bb, name)
    assert list(of) == [l.name for l in bb.layers]
    stages = []                                              # stages of the weight-carrying layers, in order
    for layer in bb.layers:
        if layer.weights and of[layer.name] not in stages:
            stages.append(of[layer.name])
    assert tuple(stages) == stage_names(name, 5)
    assert set(of.values()) <= set(stages), set(of.values()) - set(stages)
    order = [stages.index(of[l.name]) for l in bb.layers]
    assert order == sorted(order), [l.name for l, a, b in zip(bb.layers[1:], order, order[1:]) if b < a][:3]
    assert of[bb.layers[0].name] == stages[0] and of[bb.layers[-1].name] == stages[-1]
    assert len(stages) >= 3
    bns = any(isinstance(l, keras.layers.BatchNormalization) for l in bb.layers)
    assert bns == has_batchnorm(name, True)
    entry = BACKBONES[name]
    if entry["preprocess"] == "none":                        # the backbone normalises its input itself
        assert any(isinstance(l, (keras.layers.Rescaling, keras.layers.Normalization)) for l in bb.layers[:3])
    if entry["app"]:                                         # the minimum size is keras' own floor
        low = entry["min_size"]
        ctor = getattr(keras.applications, entry["app"])
        with pytest.raises(ValueError, match=f"at least {low}"):
            ctor(include_top=False, weights=None, input_shape=(low - 1, low - 1, 3))


@pytest.mark.parametrize("name", SMALLEST)
def test_every_layer_belongs_to_a_real_stage_in_order(name):
    check_stages(backbone(name), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_layer_of_every_variant_belongs_to_a_real_stage(name):
    check_stages(backbone(name, structure_only=True), name)


@pytest.mark.parametrize("name", sorted(n for n in BACKBONES if BACKBONES[n]["app"]))
def test_preprocessing_is_keras_own_for_every_backbone(name):
    """The Preprocess layer kfine puts in front of the backbone equals the family's own
    keras.applications.<module>.preprocess_input on random pixels."""
    import importlib
    from kfine.model import Preprocess
    ref_fn = importlib.import_module(f"keras.applications.{keras_module(name)}").preprocess_input
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(Preprocess(BACKBONES[name]["preprocess"])(x))
    np.testing.assert_allclose(ours, np.asarray(ref_fn(x.copy())), atol=1e-4)


def test_resnet50v2_post_bn_is_in_conv5_and_gets_its_multiplier():
    from kfine.config import FreezeConfig
    from kfine.freeze import apply_freeze
    from kfine.model import layer_stages
    from kfine.optim import variable_multipliers
    model = backbone("resnet50v2")
    bb = get_backbone(model)
    assert layer_stages(bb, "resnet50v2")["post_bn"] == "conv5"
    apply_freeze(model, "resnet50v2", FreezeConfig("stages", trainable_from="conv5"))
    assert bb.get_layer("post_bn").trainable and not bb.get_layer("conv4_block6_3_conv").trainable
    vs = model.trainable_variables
    mults = dict(zip([v.path for v in vs], variable_multipliers(model, "resnet50v2", {"conv5": 0.3}, vs)))
    assert mults[bb.get_layer("post_bn").gamma.path] == 0.3
