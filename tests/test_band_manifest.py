"""The band manifest, one field at a time: a checkpoint or an adapter trained on data that
differs from the model's in any one field that changes what the model computes is refused,
naming that field; the fields that do not (pictures, the ignored label, the default GSD) load.

Each case changes one field of the trained data description and nothing else, by as little as
1 % for the statistics, so a check that stops comparing a field, or compares it loosely, fails
here (scripts/mutants.py plants both)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from deflect import DeflectConfig, DeflectModel, get_deflect_model
from deflect.engine.checkpoint import check_manifest
from tests.conftest import S2_BANDS, s2_spec, tiny_encoder

TRAINED = dataclasses.replace(
    s2_spec(classes=("water", "forest", "urban"), ignore_index=255, nodata=0.0, gsd=10.0),
    targets=("ndvi", "height"),  # a regression head's outputs, compared like the classes
)


def one_field_changed(field: str):
    """``TRAINED`` with only ``field`` changed; ``(spec, words the refusal must contain)``."""
    mean, std = dict(TRAINED.mean), dict(TRAINED.std)
    if field == "bands-order":
        bands = list(S2_BANDS)
        bands[1], bands[2] = bands[2], bands[1]
        return s2_spec(bands, classes=TRAINED.classes, ignore_index=255, nodata=0.0,
                       gsd=10.0), "bands reordered: B2 at 2 instead of 1"  # fmt: skip
    if field == "bands-missing":
        return s2_spec(S2_BANDS[:-1], classes=TRAINED.classes, ignore_index=255, nodata=0.0,
                       gsd=10.0), "bands ['B12'] are missing"  # fmt: skip
    if field == "bands-extra":
        return s2_spec([*S2_BANDS, "B9"], classes=TRAINED.classes, ignore_index=255,
                       nodata=0.0, gsd=10.0), "bands ['B9'] were not in training"  # fmt: skip
    if field == "mean":
        mean["B8"] *= 1.01
        return dataclasses.replace(TRAINED, mean=mean), "band mean differs (B8: "
    if field == "std":
        std["B8"] *= 1.01
        return dataclasses.replace(TRAINED, std=std), "band std differs (B8: "
    if field == "reflectance_scale":
        return dataclasses.replace(TRAINED, reflectance_scale=10000.0), "reflectance_scale 1.0"
    if field == "nodata":
        return dataclasses.replace(TRAINED, nodata=-9999.0), "nodata 0.0 != -9999.0"
    if field == "sensor":
        return dataclasses.replace(TRAINED, sensor="sentinel2b"), "sensor 'sentinel2a'"
    if field == "classes":
        return dataclasses.replace(TRAINED, classes=("forest", "water", "urban")), "classes"
    if field == "targets":
        return dataclasses.replace(TRAINED, targets=("height", "ndvi")), "targets"
    # fields that do not change what the model computes from the pixels
    if field == "ignore_index":
        return dataclasses.replace(TRAINED, ignore_index=-1), None
    if field == "display_bands":
        return dataclasses.replace(TRAINED, display_bands=("B8", "B4", "B3")), None
    if field == "gsd":
        return dataclasses.replace(TRAINED, gsd=20.0), None
    raise AssertionError(field)


REFUSED = ["bands-order", "bands-missing", "bands-extra", "mean", "std", "reflectance_scale",
           "nodata", "sensor"]  # fmt: skip
ACCEPTED = ["ignore_index", "display_bands", "gsd"]
HEAD = ["classes", "targets"]  # the head's outputs: a checkpoint's concern, not an adapter's


def test_every_field_of_the_manifest_is_covered_here():
    """A new DataSpec field must be added to one of the lists above (refused or accepted)."""
    covered = {f.split("-")[0] for f in [*REFUSED, *ACCEPTED, *HEAD]}
    assert covered == {f.name for f in dataclasses.fields(TRAINED)}


@pytest.mark.parametrize("field", [*REFUSED, *HEAD])
def test_a_checkpoint_trained_on_other_data_is_refused_naming_the_field(field):
    """``load_model_state``'s manifest check (eval_dir, resume, explain): a checkpoint holds
    the head too, so other classes or regression targets (names or order) are refused as
    well."""
    given, words = one_field_changed(field)
    saved = json.dumps(TRAINED.to_dict())
    with pytest.raises(RuntimeError, match="trained on other input data") as err:
        check_manifest(SimpleNamespace(data=given), saved, "best.pt")
    assert words in str(err.value)
    check_manifest(SimpleNamespace(data=TRAINED), saved, "best.pt")  # the same data loads


@pytest.mark.parametrize("field", ACCEPTED)
def test_a_checkpoint_loads_where_only_pictures_labels_or_the_default_gsd_differ(field):
    given, _ = one_field_changed(field)
    check_manifest(SimpleNamespace(data=given), json.dumps(TRAINED.to_dict()), "best.pt")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A DEFLECT adapter saved from an encoder built for ``TRAINED``."""
    folder = tmp_path_factory.mktemp("adapter")
    get_deflect_model(tiny_encoder(TRAINED), DeflectConfig()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("field", REFUSED)
def test_an_adapter_trained_on_other_data_is_refused_naming_the_field(field, adapter):
    given, words = one_field_changed(field)
    with pytest.raises(ValueError, match="trained on other input than this model takes") as err:
        DeflectModel.from_pretrained(tiny_encoder(given), adapter)
    assert words in str(err.value)


@pytest.mark.parametrize("field", [*ACCEPTED, *HEAD])
def test_an_adapter_loads_onto_an_encoder_for_other_classes_or_pictures(field, adapter):
    """The adapter is the encoder's alone: another task's classes do not concern it."""
    given, _ = one_field_changed(field)
    assert DeflectModel.from_pretrained(tiny_encoder(given), adapter).data == given


def test_an_adapter_for_other_pretrained_bands_is_refused(adapter):
    """The same data, but the pretrained patch embedding fed B2, B3, B4 instead of B4, B3, B2."""
    encoder = tiny_encoder(TRAINED, pretrained_bands=["B2", "B3", "B4"])
    with pytest.raises(ValueError, match=r"pretrained bands \['B4', 'B3', 'B2'\] != \['B2'"):
        DeflectModel.from_pretrained(encoder, adapter)
