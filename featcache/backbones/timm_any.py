"""Any timm model by name: ``timm:convnext_tiny.fb_in22k_ft_in1k`` (architecture, then its
pretrained tag; without a tag, timm's default one).

Everything comes from timm's own description of the model, nothing is guessed: the input size,
interpolation, crop and normalisation from its pretrained config; the embedding is the pooled
input of its classifier (``forward_head(..., pre_logits=True)``); the stages ``--layers`` can add
are its ``feature_info``. Weights are found where timm keeps them (the Hugging Face hub cache),
then as ``timm-<name>.safetensors`` in the torch hub checkpoints folder, and are downloaded with
``huggingface_hub`` as timm does; ``--weights FILE`` takes a file from anywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.backbones.entry import BackboneEntry, Stage, WeightsSource
from featcache.backbones.registry import register_fallback
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFIX = "timm:"
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order: the safe format first
_WRAPPERS = ("state_dict_ema", "state_dict", "model")


def _in_hf_cache(repo: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        for filename in _HF_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
        return None

    return find


def _from_hf(repo: str) -> Callable[[], Path]:
    def fetch() -> Path:
        from huggingface_hub import errors, hf_hub_download

        missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
        try:
            return Path(hf_hub_download(repo, _HF_FILES[0]))
        except missing:  # the Hub answered: this repository has the older format only
            return Path(hf_hub_download(repo, _HF_FILES[1]))

    return fetch


def _load(model: nn.Module, state: dict) -> None:
    """Load a timm checkpoint: the Hub's timm-format tensors, or the original release's format
    through the architecture's own ``checkpoint_filter_fn`` (as ``timm.create_model`` does)."""
    for key in _WRAPPERS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    try:
        model.load_state_dict(state)
    except RuntimeError:
        convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if convert is None:
            raise
        model.load_state_dict(convert(state, model))


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _preprocessing(name: str, config: dict) -> Preprocessing:
    _, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"{name} takes {height}×{width} images; featcache supports square inputs only")
    if config["interpolation"] not in ("bilinear", "bicubic"):
        how = config["interpolation"]
        raise ValueError(f"{name} resizes with {how!r}; featcache has bilinear and bicubic")
    center = config.get("crop_mode", "center") == "center"
    return Preprocessing(
        size=height,
        resize="center_crop" if center else "stretch",
        interpolation=config["interpolation"],
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
        crop_pct=float(config["crop_pct"]) if center else 1.0,
    )


@cache
def timm_entry(name: str) -> BackboneEntry | None:
    """The registry entry for ``timm:ARCH[.TAG]``, or None for a name without the ``timm:`` prefix.

    Raises ``ValueError`` for an architecture timm does not have, or one featcache cannot feed.
    """
    if not name.startswith(PREFIX):
        return None
    import timm
    from timm.data import resolve_data_config
    from torch import nn

    model_name = name[len(PREFIX) :]
    if not timm.is_model(model_name):
        raise ValueError(f"timm has no model {model_name!r} (see timm.list_models())")
    model = timm.create_model(model_name, pretrained=False)
    config = model.pretrained_cfg
    full = f"{config['architecture']}.{config['tag']}" if config.get("tag") else config["architecture"]
    filename = f"timm-{full}.safetensors"
    if config.get("hf_hub_id"):
        repo = config["hf_hub_id"]
        source = WeightsSource(
            config.get("tag") or "default",
            filename,
            url=f"https://huggingface.co/{repo}/resolve/main/{_HF_FILES[0]}",
            bundled=_in_hf_cache(repo),
            fetch=_from_hf(repo),
            description=f"timm's pretrained weights of {full}, from the Hugging Face Hub ({repo})",
        )
    elif config.get("url"):
        url = config["url"]
        source = WeightsSource(config.get("tag") or "default", url.rsplit("/", 1)[-1], url)
    else:
        source = WeightsSource("default", filename, description=f"timm publishes no weights for {full}")
    classifier = model.get_classifier()
    feature_dim = classifier.in_features if isinstance(classifier, nn.Linear) else model.num_features
    return BackboneEntry(
        name=PREFIX + full,
        description=f"timm {full}; {feature_dim}-d, the pooled input of its classifier",
        feature_dim=feature_dim,
        preprocessing=_preprocessing(name, resolve_data_config({}, model=model)),
        weights=(source,),
        build=lambda: timm.create_model(model_name, pretrained=False),
        features=_pre_logits,
        head=lambda model: model.get_classifier(),
        load=_load,
        pools=("avg",),
        stages=tuple(Stage(f["module"], f["num_chs"], f["reduction"]) for f in model.feature_info),
    )


register_fallback(timm_entry)
