"""Tests for porting.weights: the typed registry of torchvision weights."""

from __future__ import annotations

import dataclasses
import json

import pytest

import jaxnets
from porting import gen_weights
from porting.weights import (UnknownWeightsError, Weights, all_weights, get_weights,
                             hash_prefix_of, list_weights)


def test_default_and_named_lookups_agree():
    w = get_weights("resnet50")
    assert (w.arch, w.name) == ("resnet50", "IMAGENET1K_V2")
    assert get_weights("resnet50.DEFAULT") is w
    assert get_weights(("resnet50", "IMAGENET1K_V2")) is w
    v1 = get_weights("resnet50.IMAGENET1K_V1")
    assert v1 is get_weights(("resnet50", "IMAGENET1K_V1")) and v1 is not w


def test_entry_fields_are_typed_data():
    w = get_weights("resnet50.IMAGENET1K_V2")
    assert w.url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert w.hash_prefix == "11ad3fa6" == hash_prefix_of(w.file_name)
    assert w.num_params == 25557032
    assert w.num_classes == 1000 and w.categories[0] == "tench"
    assert (w.transforms.resize_size, w.transforms.crop_size) == (232, 224)
    assert w.transforms.interpolation == "bilinear"
    assert w.transforms.mean == pytest.approx((0.485, 0.456, 0.406))
    assert w.metrics == {"acc@1": 80.858, "acc@5": 95.434}
    assert w.recipe.startswith("https://")
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.url = "elsewhere"


def test_variants_keep_their_own_preprocessing_and_options():
    swag = get_weights("vit_b_16.IMAGENET1K_SWAG_E2E_V1")
    assert (swag.transforms.crop_size, swag.transforms.interpolation) == (384, "bicubic")
    assert swag.min_size == (384, 384)
    feats = get_weights("vgg16.IMAGENET1K_FEATURES")
    assert feats.categories is None and feats.metrics["acc@1"] is None
    assert get_weights("googlenet").model_overrides == {"transform_input": True,
                                                         "aux_logits": False}
    assert get_weights("inception_v3").model_overrides == {"transform_input": True}
    assert get_weights("vit_h_14").name == "IMAGENET1K_SWAG_E2E_V1"


def test_unknown_names_list_the_alternatives():
    with pytest.raises(UnknownWeightsError) as e:
        get_weights("resnet50.IMAGENET1K_V3")
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" in str(e.value)
    with pytest.raises(UnknownWeightsError, match="resnet50") as e:
        get_weights("resnet5")
    assert "\n" not in str(e.value)


def test_list_weights_only_registered_archs():
    registered = set(jaxnets.list_models())
    listed = list_weights()
    assert "resnet50.IMAGENET1K_V2" in listed and "resnext101_64x4d.IMAGENET1K_V1" in listed
    assert {s.split(".")[0] for s in listed} <= registered
    assert list_weights("resnet18") == ["resnet18.IMAGENET1K_V1"]
    # The table also holds families not (yet) registered.
    assert {w.arch for w in all_weights()} >= {"alexnet", "vgg19_bn", "inception_v3", "vit_l_32"}


def test_committed_table_matches_installed_torchvision():
    committed = json.loads(gen_weights.OUTPUT.read_text())
    fresh = json.loads(json.dumps(gen_weights.collect()))  # tuples -> lists, as on disk
    committed.pop("torchvision_version")
    fresh.pop("torchvision_version")
    assert fresh == committed, "run python -m porting.gen_weights"


def test_every_torchvision_entry_has_a_hash_and_weights_type():
    entries = all_weights()
    assert len(entries) >= 39
    for w in entries:
        assert isinstance(w, Weights)
        assert w.hash_prefix and w.url.split("/")[-1].endswith(".pth")
        assert len(w.transforms.mean) == 3 and w.transforms.crop_size > 0
