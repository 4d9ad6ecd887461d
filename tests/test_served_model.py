"""What /v1/model says about a checkpoint: its domain, and that the schema documents every field."""
from __future__ import annotations

from model.checkpoint import load_checkpoint
from service.schemas import ModelInfo
from service.served_model import UNKNOWN_DOMAIN, ServedModel
from service.settings import DEFAULT_CHECKPOINT


def describe(path) -> dict:
    return ServedModel.from_checkpoint(path.name, load_checkpoint(path)).describe()


def test_shipped_model_states_its_domain_and_that_exits_are_no_ood_detector():
    info = describe(DEFAULT_CHECKPOINT)
    assert info["domain"].startswith("Fashion-MNIST: 28x28 grayscale")
    assert "not an out-of-distribution detector" in info["domain"]
    ModelInfo(**info, default_threshold=0.8, device="cpu", autocast="float32")


def test_checkpoint_without_a_domain_gets_the_generic_line(tiny_checkpoint):
    info = describe(tiny_checkpoint)
    assert info["domain"] == UNKNOWN_DOMAIN and "out-of-distribution" in UNKNOWN_DOMAIN
