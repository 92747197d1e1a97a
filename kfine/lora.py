"""LoRA: low-rank adapters on the backbone's Conv2D / Dense kernels (``freeze.strategy: lora``).

Keras ships the adapter (``layer.enable_lora(rank, lora_alpha)`` on Dense and Conv2D, Keras 3.15
``base_conv.py``): it adds ``lora_kernel_a`` (kernel shape minus the last axis, + rank) and
``lora_kernel_b`` (rank, filters), float32, B initialised to zeros, and the layer then uses

    kernel + (alpha / rank) * A @ B          (for a conv kernel (kh, kw, cin, r) @ (r, cout))

so an adapted model starts out computing exactly what the pretrained one did. kfine:
- enables adapters on the Conv2D / Dense layers of the chosen stages (``freeze.lora_stages``,
  all by default) when the freeze spec is first applied: kfine.fit.trainable_union applies every
  phase's spec before the optimizer is built, so the adapters exist before the optimizer is built
  and before a resume backup is loaded;
- trains only A and B there (kernel and bias frozen), BatchNorm as ``freeze.train_bn`` says
  (frozen, in inference mode, by default), the head fully;
- keeps the adapters apart in every .keras file it writes (model.keras, checkpoints): Keras'
  Conv2D / Dense save ``kernel + (alpha / rank) A @ B`` as the kernel and load zero adapters, so
  an adapted layer becomes kfine's LoRAConv2D / LoRADense (the same layer; its saved state is
  kernel, bias, A and B as they are): a LoRA run's model.keras loads with its adapters and its
  original kernels, to be inspected or trained on;
- merges the adapters for export (merge_lora): the served model is a plain backbone whose kernels
  are the merged ones, with no LoRA variables and no LoRA settings in its config.

Model code: keras.ops only.
"""
from __future__ import annotations

import keras

ADAPTED = (keras.layers.Conv2D, keras.layers.Dense)
LORA_KEYS = ("lora_rank", "lora_alpha")


class LoRAError(ValueError):
    """LoRA settings that cannot be applied; the message names the key."""


class _KeepsAdapters:
    """Saves (and loads) kernel, bias, lora_kernel_a and lora_kernel_b as they are, where Keras'
    Conv2D / Dense save the merged kernel and load zero adapters."""

    def _own_state(self) -> list:
        return [self._kernel, *([self.bias] if self.use_bias else []), self.lora_kernel_a, self.lora_kernel_b]

    def save_own_variables(self, store):
        if not (self.built and self.lora_enabled):
            return super().save_own_variables(store)
        for i, v in enumerate(self._own_state()):
            store[str(i)] = v

    def load_own_variables(self, store):
        if not (self.built and self.lora_enabled):
            return super().load_own_variables(store)
        variables = self._own_state()
        if len(store.keys()) != len(variables):
            raise LoRAError(f"layer {self.name}: the file holds {len(store.keys())} arrays for it, not its "
                            f"kernel, bias and two adapters ({len(variables)})")
        for i, v in enumerate(variables):
            v.assign(store[str(i)])


@keras.saving.register_keras_serializable(package="kfine")
class LoRAConv2D(_KeepsAdapters, keras.layers.Conv2D):
    """keras.layers.Conv2D whose adapters are saved apart from its kernel (kfine.lora)."""


@keras.saving.register_keras_serializable(package="kfine")
class LoRADense(_KeepsAdapters, keras.layers.Dense):
    """keras.layers.Dense whose adapters are saved apart from its kernel (kfine.lora)."""


KEEPS_ADAPTERS = {keras.layers.Conv2D: LoRAConv2D, keras.layers.Dense: LoRADense}
PLAIN = {f"kfine>{c.__name__}": base.__name__ for base, c in KEEPS_ADAPTERS.items()}   # for merge_lora


def enable_lora(targets: list, rank: int, alpha: float | None = None, stages=()) -> list:
    """Add adapters to the ``targets`` (kfine.freeze.lora_targets: the backbone's Conv2D / Dense
    layers of ``stages``) that have none yet; returns them. A layer already adapted must have the
    same rank and alpha (one set of adapters per layer)."""
    if int(rank) < 1:
        raise LoRAError(f"freeze.lora_rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if alpha <= 0:
        raise LoRAError(f"freeze.lora_alpha must be > 0, got {alpha}")
    if not targets:
        raise LoRAError(f"freeze.lora_stages {list(stages)} holds no Conv2D or Dense layer")
    for layer in targets:
        if not layer.lora_enabled:
            layer.enable_lora(int(rank), lora_alpha=alpha)
            # the same layer, saved with its adapters (a Keras subclass that adds no state)
            layer.__class__ = KEEPS_ADAPTERS.get(type(layer), type(layer))
        elif layer.lora_rank != int(rank) or float(layer.lora_alpha) != alpha:
            raise LoRAError(f"layer {layer.name} already has adapters of rank {layer.lora_rank} "
                            f"(alpha {layer.lora_alpha}); every lora phase must use the same "
                            f"freeze.lora_rank and freeze.lora_alpha")
    return targets


def train_adapters_only(layer) -> None:
    """The layer trains its adapters, not its kernel or bias."""
    layer.trainable = True   # Keras' setter marks every variable trainable: undo it for the others
    for v in layer.weights:
        v.trainable = v.name.startswith("lora_kernel_")


def has_lora(model) -> bool:
    return any(getattr(l, "lora_enabled", False) for l in _walk(model))


def _walk(layer):
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)


def _strip(config):
    """A Keras config with every layer's LoRA settings removed (kfine's LoRA layers: Keras' own)."""
    if isinstance(config, dict):
        if config.get("registered_name") in PLAIN:
            config = {**config, "module": "keras.layers", "class_name": PLAIN[config["registered_name"]],
                      "registered_name": None}
        return {k: _strip(v) for k, v in config.items() if k not in LORA_KEYS}
    if isinstance(config, list):
        return [_strip(v) for v in config]
    return config


def merge_lora(model):
    """A plain copy of ``model`` whose adapted kernels are kernel + (alpha / rank) * A @ B; the
    model itself when it has no adapters. The copy has no LoRA variables or settings."""
    if not has_lora(model):
        return model
    plain = type(model).from_config(_strip(model.get_config()))
    old_layers, new_layers = list(_walk(model)), list(_walk(plain))
    if [l.name for l in old_layers] != [l.name for l in new_layers]:
        raise LoRAError("merging LoRA adapters: the rebuilt model's layers differ from the original's")
    for old, new in zip(old_layers, new_layers):
        if old is model or isinstance(old, keras.Model):
            continue
        store = {}
        type(new).save_own_variables(old, store)   # Keras' Conv2D / Dense save the merged kernel
        new.load_own_variables(store)
    return plain
