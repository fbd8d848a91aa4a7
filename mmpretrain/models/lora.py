"""LoRA adapters on towers through ``peft`` (``towers.<m>.lora``; Hu et al. 2021, open_clip#585).

A model built from a config with ``lora`` has the adapters (``build_model`` injects them with peft's
``inject_adapter_in_model`` into the encoder's ``lora_module()``; peft freezes that module's own weights), so
every path that builds a model (training, resume, DDP/FSDP wrapping, loading our checkpoints) sees one module
tree, and our checkpoints hold base and adapters alike. Weights written without adapters (an open_clip
file, ``init_from``, ``model.pretrained``) load through ``load_canonical``, which maps their names onto the
adapted ones (peft's ``base_layer``). open_clip's attention keeps q, k and v in one ``nn.MultiheadAttention`` weight,
adapted as a parameter (peft's ``target_parameters``): peft's MultiheadAttention adapter instead merges and
unmerges the weight around every forward, which moves the frozen weight by float round-off each step.
``merged`` is the model with the adapters folded into the weights
(peft's merge): what ``model_id``, the open_clip export and the ONNX export see, so the adapted model, its
exports and their embeddings share one id.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace

from torch import Tensor, nn

from mmpretrain.config.schema import LoraConfig, ModelConfig
from mmpretrain.config.strict import ConfigError

BASE = re.compile(r"\.base_layer(?=\.)")


def apply_lora(encoder: nn.Module, cfg: LoraConfig, where: str) -> None:
    """Inject adapters into ``encoder.lora_module()`` at ``cfg.targets`` (default: ``encoder.lora_targets()``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    module_of, default = getattr(encoder, "lora_module", None), getattr(encoder, "lora_targets", None)
    if module_of is None or default is None:
        raise ConfigError(f"{where}: the {type(encoder).__name__} encoder does not say where adapters go")
    targets = cfg.targets if cfg.targets is not None else default()
    if isinstance(targets, list) and len(targets) == 1 and any(c in targets[0] for c in "*()|\\"):
        targets = targets[0]  # one regex, matched against whole module names
    params = cfg.parameters if cfg.parameters is not None else getattr(encoder, "lora_parameters", list)()
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        target_parameters=params or None,
    )
    module = module_of()
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    try:
        inject_adapter_in_model(peft_cfg, module)
    except ValueError as exc:
        raise ConfigError(f"{where}.targets {targets!r}: {str(exc).splitlines()[0]} (e.g. {names[:6]})") from None
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if targets and not any(not isinstance(m, ParamWrapper) for m in adapted):  # the parameters matched alone
        raise ConfigError(f"{where}.targets {targets!r}: no module of the encoder matches (e.g. {names[:6]})")


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def canonical_key(key: str) -> str:
    """An adapted model's weight name as the model without adapters calls it."""
    return BASE.sub("", key)


def load_canonical(module: nn.Module, state: dict[str, Tensor], *, strict: bool = True) -> tuple[list, list]:
    """``module.load_state_dict`` of weights named as in a model without adapters; the adapters themselves are
    not expected. Returns (missing, unexpected) as load_state_dict does, adapters left out of missing."""
    names = {canonical_key(k): k for k in module.state_dict() if ".lora_" not in k}
    missing, unexpected = module.load_state_dict({names.get(k, k): v for k, v in state.items()}, strict=False)
    missing = [k for k in missing if ".lora_" not in k]
    if strict and (missing or unexpected):
        raise RuntimeError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return missing, unexpected


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter merged into its weights and removed (peft's merge and unload):
    plain open_clip / timm / transformers modules again. ``model`` itself is untouched; without adapters it
    is returned as is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not has_lora(model):
        return model
    out = copy.deepcopy(model)
    while (found := next(((n, m) for n, m in out.named_modules() if isinstance(m, BaseTunerLayer)), None)) is not None:
        name, layer = found
        parent, _, attr = name.rpartition(".")
        if hasattr(layer, "unload_and_optionally_merge_module"):  # nn.MultiheadAttention (and its out_proj)
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            plain = layer.get_base_layer()
        setattr(out.get_submodule(parent) if parent else out, attr, plain)
    return out


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with no adapters: the architecture weights without adapters are loaded into."""
    return replace(cfg, towers={m: replace(t, lora=None) for m, t in cfg.towers.items()})


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
