"""python -m kfine.model layers: a model's stages, layers and parameters, and what a freeze spec
(or each phase of a config) leaves trainable, from a model built with weights=None: nothing is
downloaded or trained. Also what ``python -m kfine.train --dry-run`` prints.

    python -m kfine.model layers --backbone resnet50 [--strategy stages --trainable-from conv5]
    python -m kfine.model layers --config FILE [key=value ...]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import keras

from kfine.model import build_model, get_backbone, layer_stages, param_count
from kfine.registry import BACKBONES, describe_backbone
from kfine.schema import ModelConfig


def layer_table(model: keras.Model, backbone_name: str) -> list[dict]:
    """Per backbone stage, then the head: layers, layers with weights, and parameters (every
    weight, BatchNorm statistics included, as count_params counts them). Rows add up to the model."""
    rows: dict[str, dict] = {}

    def add(stage, layer):
        r = rows.setdefault(stage, {"stage": stage, "layers": 0, "weight_layers": 0, "params": 0})
        r["layers"] += 1
        r["weight_layers"] += int(bool(layer.weights))
        r["params"] += sum(param_count(w) for w in layer.weights)

    stages = layer_stages(get_backbone(model), backbone_name)
    for layer in get_backbone(model).layers:
        add(stages[layer.name], layer)
    for layer in model.layers:
        if layer.name != "backbone" and not isinstance(layer, keras.layers.InputLayer):
            add("head" if layer.name.startswith("head_") else layer.name, layer)
    return list(rows.values())


def format_layer_table(rows: list[dict]) -> str:
    lines = [f"{'stage':<12}{'layers':>8}{'with weights':>14}{'parameters':>14}"]
    for r in rows:
        lines.append(f"{r['stage']:<12}{r['layers']:>8}{r['weight_layers']:>14}{r['params']:>14,}")
    lines.append(f"{'total':<12}{sum(r['layers'] for r in rows):>8}{sum(r['weight_layers'] for r in rows):>14}"
                 f"{sum(r['params'] for r in rows):>14,}")
    return "\n".join(lines)


def describe_model(cfg, num_classes: int, image_size, phases=()) -> str:
    """The layer table of the model ``cfg`` (a ModelConfig) builds, with weights=None, and what
    each (label, FreezeConfig[, bn mode]) in ``phases`` leaves trainable. Nothing is trained or
    written."""
    from kfine.freeze import apply_freeze, format_summary, trainable_summary
    model = build_model(dataclasses.replace(cfg, weights=None), num_classes, image_size)
    info = describe_backbone(cfg.backbone, len(cfg.scratch.filters), cfg.scratch.batchnorm)
    parts = [f"{cfg.backbone} at {image_size[0]}x{image_size[1]}, head for {num_classes} classes "
             f"(built with weights=None)\n{info}\n{format_layer_table(layer_table(model, cfg.backbone))}"]
    phases = [(label, spec, *(bn or ("train",))) for label, spec, *bn in phases]
    for _, spec, bn in phases:    # first every spec (lora adds its variables), as training does
        apply_freeze(model, cfg.backbone, spec, bn)
    for label, spec, bn in phases:
        apply_freeze(model, cfg.backbone, spec, bn)
        parts.append(f"{label}: freeze {spec.strategy}, bn: {bn}\n"
                     f"{format_summary(trainable_summary(model, cfg.backbone))}")
    return "\n\n".join(parts)


def describe_config(cfg, num_classes: int | None = None) -> str:
    """describe_model for a whole run config: its model, image size and every phase (its epochs
    counted from 1, as the training log counts them). No image is read: the head is sized for
    ``num_classes``, else the data folder's class folders (``class_count``), else 2."""
    if num_classes is None:
        num_classes = class_count(cfg.data) or 2
    starts = [p.start_epoch for p in cfg.train.phases]
    ends = starts[1:] + [cfg.train.epochs]
    phases = [(f"phase {i} (epochs {p.start_epoch + 1}..{end} of {cfg.train.epochs})", p.freeze, p.bn)
              for i, (p, end) in enumerate(zip(cfg.train.phases, ends))]
    return describe_model(cfg.model, num_classes, tuple(cfg.data.image_size), phases)


def class_count(data_cfg) -> int | None:
    """The classes a run on ``data_cfg`` will have, from the names of the data folder's class
    folders (nothing decoded, no file listed), 10 for the digits demo; None where that cannot be
    told without reading the data (a tfds source, a missing folder, an unclear layout)."""
    if data_cfg.source == "digits":
        return 10
    if data_cfg.source != "folder" or not data_cfg.root:
        return None
    from kfine import sources
    root = Path(data_cfg.root)
    try:
        layout = sources.detect_layout(root) if data_cfg.layout == "auto" else data_cfg.layout
        first = root / (sources.LAYOUTS[layout] or ("",))[0]
        return len([d for d in first.iterdir() if d.is_dir() and not d.name.startswith(".")]) or None
    except (OSError, KeyError, ValueError):
        return None


def main(argv=None) -> int:
    """python -m kfine.model layers --backbone resnet50 [--strategy S ...] | --config FILE [key=value ...]"""
    import argparse
    from kfine import cli
    from kfine.checks import check_config
    from kfine.config import load_config, replace
    from kfine.schema import FreezeConfig
    ap = argparse.ArgumentParser(prog="python -m kfine.model", description="Inspect a model without training it.")
    sub = ap.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("layers", help="stages, layers and parameters; what a freeze spec (or each phase) trains")
    lp.add_argument("--backbone", default="resnet50", help=f"one of {sorted(BACKBONES)}")
    lp.add_argument("--config", help="a run config: its model, image size and every phase")
    lp.add_argument("--strategy", help="a freeze strategy (kfine.freeze.STRATEGIES)")
    lp.add_argument("--trainable-from", help="stages: first trainable stage (conv4 | layer3 ...)")
    lp.add_argument("--fraction", type=float, default=0.0, help="fraction: share of weight layers frozen")
    lp.add_argument("--pattern", help="regex: layers whose name matches train")
    lp.add_argument("--train-bn", action="store_true", help="regex/fraction/lora: also train BatchNorm")
    lp.add_argument("--lora-rank", type=int, default=8)
    lp.add_argument("--lora-stages", nargs="*", default=[])
    lp.add_argument("--image-size", type=int, default=None, help="square input size (default 224, or the config's)")
    lp.add_argument("--num-classes", type=int, default=None,
                    help="classes of the head (default: with --config its class folders, else 10)")
    lp.add_argument("overrides", nargs="*", metavar="key=value", help="with --config")
    args = ap.parse_args(argv)

    def layers() -> None:
        if args.config:
            cfg = load_config(cli.find_config(args.config), args.overrides)
            if args.image_size:
                cfg = replace(cfg, [f"data.image_size=[{args.image_size},{args.image_size}]"])
            print(describe_config(check_config(cfg), args.num_classes))
            return
        size = args.image_size or 224
        phases = []
        if args.strategy:
            phases = [("freeze spec", FreezeConfig(strategy=args.strategy, fraction=args.fraction,
                                                   trainable_from=args.trainable_from, pattern=args.pattern,
                                                   train_bn=args.train_bn, lora_rank=args.lora_rank,
                                                   lora_stages=tuple(args.lora_stages)))]
        print(describe_model(ModelConfig(backbone=args.backbone), args.num_classes or 10, (size, size), phases))
    return cli.run_command(layers)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
