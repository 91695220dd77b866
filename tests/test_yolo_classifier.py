"""yolov8n-cls in the zoo: a whole-frame classifier built from ultralytics' layers, loaded from a
state dict, preprocessed as the YOLO backbone expects, and mergeable block by block."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeva.merging.blocks import BlockChain
from edgeva.merging.distill import adapter_for
from edgeva.models import build_model, default_input_size, zoo_kind
from edgeva.models.errors import ModelLoadError
from edgeva.models.outputs import ClassProbs
from edgeva.models.preprocess import resize_normalise


def frames(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (120, 160, 3), np.uint8) for _ in range(n)]


def test_yolov8n_cls_is_a_classifier_in_the_zoo():
    assert zoo_kind("yolov8n-cls") == "classifier"
    assert default_input_size("yolov8n-cls") == 224
    model = build_model("yolov8n-cls")
    out = model.predict(frames(2))
    assert len(out) == 2 and isinstance(out[0], ClassProbs) and out[0].probs.shape == (1000,)


def test_weights_round_trip_with_class_names_and_same_outputs(tmp_path):
    from edgeva.models.yolo_classifier import yolo_classifier_network

    torch.manual_seed(0)
    net = yolo_classifier_network("yolov8n-cls", 3)
    path = tmp_path / "copy.pt"
    torch.save({"state_dict": net.state_dict(), "class_names": ["light", "moderate", "heavy"]}, path)
    model = build_model("yolov8n-cls", str(path))
    assert model.class_names == ["light", "moderate", "heavy"]
    # inputs are RGB in [0, 1] without ImageNet's mean/std, as the YOLO backbone was trained
    x = resize_normalise(frames(), 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with torch.no_grad():
        want = torch.softmax(net.eval()(x), 1).numpy()
    got = np.stack([o.probs for o in model.predict(frames())])
    assert np.allclose(got, want, atol=1e-5)


def test_a_state_dict_of_another_architecture_is_refused_naming_the_file(tmp_path):
    import torchvision

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), path)
    with pytest.raises(ModelLoadError, match="resnet.pt"):
        build_model("yolov8n-cls", str(path))


def test_merging_runs_it_block_by_block_on_the_models_own_inputs():
    model = build_model("yolov8n-cls")
    adapter = adapter_for(model)
    x = adapter.inputs(frames())
    assert torch.equal(x, resize_normalise(frames(), 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    chain = BlockChain.of(model.module, x[:1])
    assert len(chain) == 10                   # nine backbone layers and the head
    with torch.no_grad():
        logits = chain.run(x, 0)
    assert np.allclose(torch.softmax(logits, 1).numpy(), np.stack([o.probs for o in model.predict(frames())]),
                       atol=1e-5)


def test_the_device_resize_path_uses_the_same_normalisation():
    """predict on CUDA builds inputs with resize_normalise_tensor; on the CPU it gives the same
    tensor as resize_normalise for yolov8n-cls's (0, 1) inputs, not ImageNet's."""
    from edgeva.models.preprocess import resize_normalise_tensor

    none = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    host = resize_normalise(frames(), 224, *none)
    device = resize_normalise_tensor(frames(), 224, "cpu", *none)
    assert host.min() >= 0.0 and host.max() <= 1.0
    assert torch.allclose(host, device, atol=1 / 255 + 1e-6)
