"""Why the model says what it says: Grad-CAM class-activation heatmaps.

Grad-CAM (Selvaraju et al. 2017; keras.io's "Grad-CAM class activation visualization"): the
gradient of a class's logit with respect to the last convolutional feature map weighs its
channels; the weighted sum of the channels, through a ReLU and scaled to 0..1, is upsampled to
the image: where the evidence for that class lies. kfine weighs each position by its own
gradient (HiResCAM), which is Grad-CAM's channel-averaged weighting exactly behind an
average-pooled backbone and stays faithful behind the scratch CNN's Flatten (see ``gradcam``).

kfine's model is nested (image -> "preprocess" -> "backbone" model -> head -> logits), so the
heatmap model is rebuilt as two functions: ``features`` (image -> the backbone's last 4-D
output, before its pooling or flatten) and ``classify`` (that map -> the backbone's remaining
layers -> the head -> logits; an older model's final softmax is left out). The gradient is
the backend's own (tf.GradientTape, jax.grad, torch.autograd); everything else is keras.ops.
EMA and best-epoch weights are simply the weights the model holds; LoRA layers are called as
they are.

A heatmap is only as fine as the feature map: ResNet50 at 224 px has a 7x7 map, at 32 px 1x1
(one value: a flat heatmap), a scratch_cnn after k poolings (H / 2^k).

    python -m kfine.explain --run runs/NAME [--split test]     # plots/heatmaps_<split>.png
    python -m kfine.predict --run runs/NAME --images ... --explain   # one overlay per image
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import keras
from keras import ops

GRID_TOP_LOSS = 12        # the grid: the highest-loss images ...
GRID_PER_CLASS_MAX = 12   # ... and one correct image for each of up to this many classes


class ExplainError(ValueError):
    """A model whose heatmap cannot be computed; the message says why."""


# ----------------------------------------------------------------------------- the two halves
def _last_feature_map(backbone):
    """Index of the backbone's last layer with a 4-D output (the pooling / flatten follows it)."""
    idx = [i for i, layer in enumerate(backbone.layers) if len(layer.output.shape) == 4]
    if not idx:
        raise ExplainError(f"the backbone {backbone.name!r} has no 4-D (convolutional) output to explain")
    return idx[-1]


def cam_parts(model, check: bool = True):
    """(features, classify): image -> last conv feature map, feature map -> logits. ``check``: run
    one random image through both halves and the model and compare (ExplainError if they differ);
    a caller that has the model's probabilities of the images it explains compares against those
    instead (parts_agree), with no extra model pass."""
    from kfine.model import get_backbone, outputs_logits, probabilities
    backbone = get_backbone(model)
    last = _last_feature_map(backbone)
    conv = backbone.layers[last]
    features_inner = keras.Model(backbone.inputs, conv.output, name="cam_features")
    tail = backbone.layers[last + 1:]
    outer = list(model.layers)
    head = outer[outer.index(backbone) + 1:]
    if head and not outputs_logits(model):   # an older model's softmax: Grad-CAM differentiates the logit
        head = head[:-1]
    chain = tail + head   # kfine's backbones end in a chain: [norm/activation ->] pooling or flatten
    preprocess = model.get_layer("preprocess")

    def features(images):
        return features_inner(preprocess(images), training=False)

    def classify(fmap):
        x = fmap
        for layer in chain:
            x = layer(x, training=False) if _takes_training(layer) else layer(x)
        return x

    if check:   # the two halves must be the model: one image through both against the model's probabilities
        h, w = (int(d) if d else 32 for d in model.input_shape[1:3])
        x = ops.convert_to_tensor(np.random.default_rng(0).uniform(0, 255, (1, h, w, 3)).astype(np.float32))
        got = ops.convert_to_numpy(ops.softmax(ops.cast(classify(features(x)), "float32"), axis=-1))
        if not parts_agree(got, ops.convert_to_numpy(probabilities(model, x))):
            raise ExplainError(f"the heatmap model (backbone up to {conv.name!r}, then "
                               f"{[l.name for l in chain]}) does not reproduce the model's outputs")
    return features, classify


def parts_agree(got, want) -> bool:
    """Whether the heatmap model's probabilities ``got`` are the model's ``want``."""
    return bool(np.allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-2))


def _takes_training(layer) -> bool:
    return isinstance(layer, (keras.layers.Dropout, keras.layers.BatchNormalization, keras.Model))


def _gradient(fn, x):
    """(fn(x), d sum(fn(x)) / dx) with the backend's own differentiation."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, x)
    if backend == "jax":
        import jax
        return jax.value_and_grad(fn)(x)
    if backend == "torch":
        import torch
        x = x.detach().requires_grad_(True)
        y = fn(x)
        (grad,) = torch.autograd.grad(y, x)
        return y, grad
    raise ExplainError(f"Grad-CAM is not implemented for the {backend!r} backend")


# ----------------------------------------------------------------------------- heatmaps
def gradcam(model, images, classes=None, parts=None, pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps of ``images`` (float 0..255 [N, H, W, 3], what the model takes) for ``classes``
    ([N] class indices; by default each image's predicted class). Returns (heatmaps float32
    [N, H, W] in 0..1, probabilities float32 [N, C]). A map with no positive evidence is all 0.

    Each position's channels are weighted by the gradient at that position (gradient x
    activation, summed over channels: HiResCAM). Behind an average-pooled backbone (every
    keras.applications one) the gradient is the same at every position, so this is Grad-CAM
    exactly (up to the scale the 0..1 normalisation removes). Behind the scratch CNN's Flatten
    the gradients differ by position and their average (``pooled=True``, classic Grad-CAM) can
    cancel out: on the two-square test task it gave all-zero maps for one class in two seeds of
    three, where the per-position weights point at the square in all three."""
    features, classify = parts or cam_parts(model)
    x = ops.convert_to_tensor(np.asarray(images, np.float32))
    fmap = features(x)
    logits = classify(fmap)
    probs = ops.convert_to_numpy(ops.softmax(ops.cast(logits, "float32"), axis=-1)).astype(np.float32)
    if classes is None:
        classes = probs.argmax(axis=-1)
    onehot = ops.one_hot(ops.convert_to_tensor(np.asarray(classes, np.int32)), probs.shape[-1])

    def score(f):
        return ops.sum(ops.cast(classify(f), "float32") * onehot)
    _, grads = _gradient(score, fmap)
    grads, fmap = ops.cast(grads, "float32"), ops.cast(fmap, "float32")
    if pooled:   # Grad-CAM: one weight per channel, the gradient averaged over the positions
        grads = ops.mean(grads, axis=(1, 2), keepdims=True)
    cam = ops.relu(ops.sum(fmap * grads, axis=-1))   # [N, h, w]
    h, w = int(x.shape[1]), int(x.shape[2])
    cam = ops.image.resize(cam[..., None], (h, w), interpolation="bilinear")[..., 0]
    cam = np.maximum(ops.convert_to_numpy(cam).astype(np.float64), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)   # scaled after the upsampling: each map peaks at 1
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return np.clip(cam, 0.0, 1.0).astype(np.float32), probs


def explain_images(model, images, classes=None, batch_size: int = 16, probs=None):
    """``gradcam`` over batches of ``images``: (heatmaps [N, H, W], probabilities [N, C]).
    ``probs``: the model's probabilities of ``images`` (an evaluation's): the heatmap model is
    checked against them (parts_agree) instead of by a model pass of its own (which still
    decides when they differ)."""
    parts = cam_parts(model, check=probs is None)
    given, maps, probs = probs, [], []
    images = np.asarray(images, np.float32)
    for start in range(0, len(images), batch_size):
        c = None if classes is None else np.asarray(classes)[start:start + batch_size]
        m, p = gradcam(model, images[start:start + batch_size], c, parts)
        maps.append(m)
        probs.append(p)
    if not maps:
        h, w = images.shape[1:3] if images.ndim == 4 else (0, 0)
        return np.zeros((0, h, w), np.float32), np.zeros((0, model.output_shape[-1]), np.float32)
    if given is not None and not parts_agree(np.concatenate(probs), given):
        cam_parts(model)   # the model's own check decides (the given figures may be another precision's)
    return np.concatenate(maps), np.concatenate(probs)


def overlay(image, heatmap, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB: ``image`` (0..255 [H, W, 3]) under the heatmap in the jet colour map."""
    from matplotlib import colormaps
    colour = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * np.asarray(image, np.float32) + alpha * colour
    return np.clip(out, 0, 255).round().astype(np.uint8)


def write_overlays(images, heatmaps, names, out_dir, taken=()) -> list[Path]:
    """One PNG per image in ``out_dir``: the overlay, named after ``names`` (file stems; a stem
    already used, here or in ``taken``, gets _2, _3, ...)."""
    from kfine.rundir import atomic_write_png
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, seen = [], {}
    for name in taken:
        stem = Path(str(name)).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
    for image, heat, name in zip(images, heatmaps, names):
        stem = Path(str(name)).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:   # two files with the same name in different folders
            stem = f"{stem}_{seen[stem]}"
        paths.append(atomic_write_png(overlay(image, heat), out_dir / f"{stem}.png"))
    return paths


def explain_files(model, paths, image_size, out_dir, transform: dict | None = None, batch_size: int = 16) -> list[Path]:
    """One overlay PNG per readable image file in ``out_dir`` (named after the file), for the
    class the model predicts; the images go through the run's eval transform (``transform``)."""
    from kfine.pipeline import load_images
    parts, written, names = cam_parts(model), [], []
    for start in range(0, len(paths), batch_size):
        images, ok, _ = load_images([str(p) for p in paths[start:start + batch_size]], tuple(image_size),
                                    **(transform or {}))
        if len(ok):
            heat, _ = gradcam(model, images.astype(np.float32), None, parts)
            names.extend(ok)
            written.extend(write_overlays(images, heat, ok, out_dir, taken=names[:-len(ok)]))
    return written


# ----------------------------------------------------------------------------- the report's grid
def pick_images(labels, probs, top_loss: int = GRID_TOP_LOSS, per_class_max: int = GRID_PER_CLASS_MAX) -> list[int]:
    """Indices to show: the ``top_loss`` highest-loss images, then for each of the first
    ``per_class_max`` classes its most confident correct image (when it has one)."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))
    chosen = [int(i) for i in np.argsort(-loss, kind="stable")[:top_loss]]
    pred = probs.argmax(axis=1)
    for c in range(min(per_class_max, probs.shape[1])):
        right = np.flatnonzero((labels == c) & (pred == c))
        right = [int(i) for i in right if int(i) not in chosen]
        if right:
            chosen.append(max(right, key=lambda i: probs[i, c]))
    return chosen


def plot_heatmap_grid(images, heatmaps, labels, probs, class_names, path, titles=None, cell: int = 128) -> Path:
    """A PNG grid of (image, overlay) pairs, 4 pairs a row, each captioned with its title, true
    class, predicted class and probability (green when right, red when wrong). Drawn with PIL:
    a report's grid costs milliseconds, not a matplotlib figure."""
    from PIL import Image, ImageDraw
    from kfine.rundir import atomic_write_png
    n, cols, caption, pad = len(images), 4, 30, 6
    rows = max(1, -(-n // cols))
    width = cols * (2 * cell + pad) + pad
    sheet = Image.new("RGB", (width, rows * (cell + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(n):
        r, c = divmod(k, cols)
        x0, y0 = pad + c * (2 * cell + pad), pad + r * (cell + caption + pad)
        img = np.clip(np.asarray(images[k], np.float32), 0, 255).round().astype(np.uint8)
        for j, tile in enumerate((img, overlay(img, heatmaps[k]))):
            sheet.paste(Image.fromarray(tile).resize((cell, cell), Image.BILINEAR), (x0 + j * cell, y0))
        pred, true = int(np.argmax(probs[k])), int(labels[k])
        head = (f"{titles[k]}: " if titles else "") + f"true {class_names[true]}"
        draw.text((x0, y0 + cell + 2), head[:2 * cell // 6], fill="black")
        draw.text((x0, y0 + cell + 15), f"pred {class_names[pred]} {probs[k][pred]:.2f}"[:2 * cell // 6],
                  fill=(0, 130, 0) if pred == true else (200, 0, 0))
    return atomic_write_png(sheet, path)


def feature_map_size(model) -> tuple[int, int]:
    """(h, w) of the backbone's last feature map: the heatmap's resolution."""
    from kfine.model import get_backbone
    backbone = get_backbone(model)
    shape = backbone.layers[_last_feature_map(backbone)].output.shape
    return int(shape[1] or 0), int(shape[2] or 0)


def write_heatmap_grid(run_dir, model, dataset, class_names, split: str = "test", probs=None,
                       labels=None) -> Path | None:
    """plots/heatmaps_<split>.png for the report: Grad-CAM of the highest-loss images of the
    split and one correct image per class (pick_images). None when the split is empty or the
    feature map is a single position (ResNet50 below 64 px: every heatmap would be flat).
    ``probs``/``labels``: the model's probabilities and the labels of the split in dataset order
    (an evaluation's): then only the picked images are kept, and the model runs on those only."""
    if feature_map_size(model) == (1, 1):
        print("kfine: no heatmaps: the backbone's last feature map is 1x1 at this image size", flush=True)
        return None
    if probs is not None and labels is not None:
        idx = pick_images(np.asarray(labels), np.asarray(probs))
        images, seen = {}, 0
        for batch in dataset:   # the picked images only (the cache decodes; nothing runs the model)
            x = np.asarray(batch[0], np.float32)
            images.update({int(i): x[i - seen] for i in idx if seen <= i < seen + len(x)})
            seen += len(x)
        if not images or len(images) < len(idx):
            return None
        images, labels, probs = np.stack([images[int(i)] for i in idx]), np.asarray(labels)[idx], np.asarray(probs)[idx]
        idx = np.arange(len(idx))
    else:
        images, labels = [], []
        for batch in dataset:
            images.append(np.asarray(batch[0], np.float32))
            labels.append(np.asarray(batch[1]).reshape(-1).astype(np.int64))
        if not images:
            return None
        images, labels = np.concatenate(images), np.concatenate(labels)
        if not len(images):
            return None
        from kfine.model import probabilities
        probs = np.concatenate([np.asarray(keras.ops.convert_to_numpy(probabilities(model, images[i:i + 64])))
                                for i in range(0, len(images), 64)])
        idx = pick_images(labels, probs)
    # one batch (at most GRID_TOP_LOSS + GRID_PER_CLASS_MAX images): one input shape for the eager backbone
    heat, _ = explain_images(model, images[idx], probs[idx].argmax(axis=1), batch_size=max(1, len(idx)),
                             probs=probs[idx])
    n_loss = min(GRID_TOP_LOSS, len(images))
    titles = ["high loss" if k < n_loss else "correct" for k in range(len(idx))]
    return plot_heatmap_grid(images[idx], heat, labels[idx], probs[idx], class_names,
                             Path(run_dir) / "plots" / f"heatmaps_{split}.png", titles)


# ----------------------------------------------------------------------------- CLI
def explain_run(run_dir, split: str = "test") -> Path | None:
    """Write plots/heatmaps_<split>.png for a finished run (its model.keras and splits.csv)."""
    from kfine import data as kdata
    from kfine.checks import check_config
    from kfine.config import load_config
    from kfine.checkpoint import load_model
    from kfine.rundir import missing_run_file, read_json
    run_dir = Path(run_dir)
    missing = missing_run_file(run_dir, ("model.keras", "class_names.json", "config.yaml"))
    if missing:
        raise FileNotFoundError(missing)
    cfg = check_config(load_config(run_dir / "config.yaml"))
    saved = run_dir / "splits.csv"
    datasets = kdata.make_datasets(cfg.data, cfg.seed, splits=saved if saved.exists() else None)
    from kfine.evaluate import eval_views
    dataset = eval_views(datasets, split)
    if dataset is None:
        raise ExplainError(f"the run's data has no {split!r} split")
    model, class_names = load_model(run_dir / "model.keras"), read_json(run_dir / "class_names.json")
    return write_heatmap_grid(run_dir, model, dataset, class_names, split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.explain", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory (model.keras, config.yaml, splits.csv)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    args = ap.parse_args(argv)
    from kfine import cli

    def work():
        path = explain_run(args.run, args.split)
        print(f"kfine: wrote {path}" if path else f"kfine: the {args.split} split is empty", flush=True)
    return cli.run_command(work, ExplainError)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
