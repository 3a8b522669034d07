"""LoRA adapters (through ``peft``) on the top blocks of a text or image encoder.

``encoder_peft: lora`` puts low-rank adapters on the linear (and, for CNNs, convolution) layers of
the encoder's top ``k`` blocks -- the blocks full tuning would train -- and freezes every weight of
the encoder itself. The blocks below stay exactly as they are, so their per-item output cache
(:mod:`recbole_mm.encoders.text`, :mod:`recbole_mm.encoders.image`) stays valid. Adapters are
injected in place (``peft.inject_adapter_in_model``): the model keeps its structure and attribute
names, and its state_dict gains the adapter weights (``...lora_A.default.weight``).
"""

import torch
import torch.nn as nn

LORA_KEYS = ("r", "alpha", "dropout", "target")


def lora_settings(config, prefix="lora_"):
    """``{r, alpha, dropout, target}`` from a config's ``lora_*`` keys (defaults in the model YAML)."""
    return {"r": int(config[f"{prefix}r"]), "alpha": float(config[f"{prefix}alpha"]),
            "dropout": float(config[f"{prefix}dropout"]), "target": config[f"{prefix}target"]}


def _as_plain_conv(m):
    """A plain ``nn.Conv2d`` sharing ``m``'s weight and bias when ``m`` is a subclass (e.g. a TF-style
    'same'-padding convolution) that computes exactly a plain convolution (checked on a probe), else
    None. peft builds its adapter layers with the base layer's own class, which such subclasses'
    constructors reject; a 1x1, stride-1 convolution needs no padding, so it is a plain one."""
    if m.kernel_size != (1, 1) or m.stride != (1, 1) or m.groups != 1:
        return None
    plain = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=m.bias is not None, device=m.weight.device,
                      dtype=m.weight.dtype)
    plain.weight = m.weight
    plain.bias = m.bias
    with torch.no_grad():
        probe = torch.randn(1, m.in_channels, 3, 3, device=m.weight.device, dtype=m.weight.dtype)
        same = torch.allclose(m(probe), plain(probe), atol=1e-5)
    return plain if same else None


def _plain_convs(blocks):
    """Replace, inside ``blocks``, the Conv2d subclasses that are plain 1x1 convolutions by plain ones."""
    for b in blocks:
        for parent in list(b.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                    plain = _as_plain_conv(child)
                    if plain is not None:
                        setattr(parent, child_name, plain)


def _targets(model, blocks, target):
    """Full names of the modules inside ``blocks`` that get adapters: every ``nn.Linear`` /
    ``nn.Conv2d`` (``target`` None), or those whose own name (last part) is in ``target``.
    Subclasses peft cannot rebuild (see :func:`_as_plain_conv`) and depthwise convolutions are
    left without adapters."""
    inside = {id(m) for b in blocks for m in b.modules()}
    names = []
    for name, m in model.named_modules():
        if id(m) not in inside or type(m) not in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue  # depthwise convolutions: peft's LoRA supports groups == 1 only
        if target is not None and name.rsplit(".", 1)[-1] not in target:
            continue
        names.append(name)
    return names


def apply_lora(model, blocks, r=8, alpha=16.0, dropout=0.0, target=None):
    """Inject LoRA adapters into the layers of ``blocks`` (modules of ``model``); every other
    parameter of ``model`` is frozen. Returns the adapted module names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("encoder_peft: lora needs the peft package: pip install peft "
                          "(or pip install 'recbole_mm[peft]')") from None
    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    if target is not None:
        target = [target] if isinstance(target, str) else list(target)
    _plain_convs(blocks)
    names = _targets(model, blocks, target)
    if not names:
        raise ValueError(f"LoRA: no linear / convolution layer in the trainable blocks matches lora_target {target!r}")
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=names)
    inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    return names
