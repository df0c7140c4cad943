"""Label-free distillation recovers a pruned student from its teacher (digits CNN trained here: fast)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from converters.distill import DistillConfigError, distill, distillation_loss  # noqa: E402
from converters.prune import prune_model  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from examples import digits_cnn  # noqa: E402


@pytest.fixture(scope="module")
def digits(cache_dir: object) -> dict[str, object]:
    torch.set_num_threads(2)
    teacher = digits_cnn.build()
    x_train, _, x_test, y_test = digits_cnn.load_split()
    calib = x_train[np.random.default_rng(0).choice(len(x_train), size=256, replace=False)]
    return {"teacher": teacher, "calib": calib, "x_test": x_test, "y_test": y_test}


def _kl_and_agreement(
    student: torch.nn.Module, teacher: torch.nn.Module, x: np.ndarray
) -> tuple[float, float]:
    inputs = torch.from_numpy(x)
    with torch.no_grad():
        produced, wanted = student.eval()(inputs), teacher(inputs)
        kl = float(distillation_loss([produced], [wanted], temperature=4.0))
    return kl, float((produced.argmax(1) == wanted.argmax(1)).float().mean())


def test_distillation_lowers_kl_and_raises_agreement_with_the_teacher(digits: dict) -> None:
    teacher, x_test = digits["teacher"], digits["x_test"]
    pruned = prune_model(teacher, torch.from_numpy(x_test[:1]), 0.3, "structured").model
    kl_before, agreement_before = _kl_and_agreement(pruned, teacher, x_test)

    steps: list[int] = []
    result = distill(
        pruned,
        teacher,
        [digits["calib"]],
        steps=200,
        batch_size=32,
        on_step=lambda step, _: steps.append(step),
    )
    kl_after, agreement_after = _kl_and_agreement(result.model, teacher, x_test)

    assert result.model is pruned and not result.model.training
    assert steps == list(range(200)) and len(result.losses) == 200 and result.seconds > 0
    assert np.mean(result.losses[-10:]) < 0.5 * np.mean(result.losses[:10])
    # measured on held-out images the student never saw
    assert kl_after < 0.5 * kl_before
    assert agreement_after > agreement_before + 0.2
    assert agreement_after >= 0.95
    accuracy = digits_cnn.accuracy(result.model, x_test, digits["y_test"])
    teacher_accuracy = digits_cnn.accuracy(teacher, x_test, digits["y_test"])
    assert accuracy >= teacher_accuracy - 0.03, (accuracy, teacher_accuracy)


def test_distillation_is_deterministic_for_a_seed_and_leaves_the_teacher_alone(digits: dict) -> None:
    teacher = digits["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    example = torch.from_numpy(digits["x_test"][:1])
    runs = [
        distill(
            prune_model(teacher, example, 0.3, "structured").model, teacher, [digits["calib"][:64]], steps=8
        )
        for _ in range(2)
    ]
    assert runs[0].losses == runs[1].losses
    other = distill(
        prune_model(teacher, example, 0.3, "structured").model,
        teacher,
        [digits["calib"][:64]],
        steps=8,
        seed=1,
    )
    assert other.losses != runs[0].losses
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert not teacher.training


def test_batch_norm_statistics_stay_those_of_the_teachers_training_set(digits: dict) -> None:
    """A few calibration images must not overwrite the running statistics (they would describe those
    images, not the world); BatchNorm's affine weights still learn."""
    teacher = digits["teacher"]
    student = prune_model(teacher, torch.from_numpy(digits["x_test"][:1]), 0.3, "structured").model
    batch_norms = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms
    frozen = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in batch_norms]
    for batch_size in (1, 8):
        samples = [digits["calib"][i : i + 1] for i in range(16)]
        distill(student, teacher, samples, steps=5, batch_size=batch_size)
    for module, (mean, var, _) in zip(batch_norms, frozen, strict=True):
        torch.testing.assert_close(module.running_mean, mean)
        torch.testing.assert_close(module.running_var, var)
    assert any(not torch.equal(m.weight, w) for m, (_, _, w) in zip(batch_norms, frozen, strict=True))


class TwoHeads(torch.nn.Module):
    """A non-classifier: a feature map and a box-like regression output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())
        self.dense = torch.nn.Conv2d(32, 4, 1)
        self.boxes = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.dense(features), self.boxes(features.mean(dim=(2, 3)))


def test_unstructured_sparsity_survives_distillation_when_zeros_are_kept(digits: dict) -> None:
    """Training moves every zeroed weight unless the distiller holds them at zero: with keep_zeros the
    student keeps the pruned sparsity (and the same zero positions) and still gets closer to the teacher."""
    teacher, x_test = digits["teacher"], digits["x_test"]
    example = torch.from_numpy(x_test[:1])

    def sparsity(model: torch.nn.Module) -> float:
        weights = [p.detach() for p in model.parameters() if p.dim() > 1]
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    pruned = prune_model(teacher, example, 0.7, "unstructured").model
    zeros_before = {name: p.detach() == 0 for name, p in pruned.named_parameters() if p.dim() > 1}
    kl_before, _ = _kl_and_agreement(pruned, teacher, x_test)
    kept = distill(pruned, teacher, [digits["calib"]], steps=60, batch_size=32, keep_zeros=True).model
    assert sparsity(kept) == pytest.approx(0.7, abs=0.01)
    for name, p in kept.named_parameters():
        if name in zeros_before:
            assert bool((p.detach()[zeros_before[name]] == 0).all()), name
    assert _kl_and_agreement(kept, teacher, x_test)[0] < kl_before

    redensified = prune_model(teacher, example, 0.7, "unstructured").model
    distill(redensified, teacher, [digits["calib"]], steps=60, batch_size=32)
    assert sparsity(redensified) < 0.05  # what keep_zeros prevents


def test_multi_output_models_are_distilled_with_mse() -> None:
    torch.manual_seed(0)
    teacher = TwoHeads().eval()
    student = TwoHeads()  # untrained: far from the teacher
    samples = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    probe = torch.randn(8, 3, 16, 16)

    def mse() -> float:
        with torch.no_grad():
            return float(distillation_loss(list(student.eval()(probe)), list(teacher(probe)), 4.0))

    before = mse()
    result = distill(student, teacher, samples, steps=60, lr=3e-3, batch_size=8)
    assert mse() < 0.5 * before
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"samples": []}, "no calibration samples"),
        ({"steps": -1}, "--distill-steps"),
        ({"lr": 0.0}, "--distill-lr"),
        ({"lr": float("nan")}, "--distill-lr"),
        (
            {"samples": [np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 3, 9, 9), np.float32)]},
            "different shapes",
        ),
        ({"samples": ["image.png"]}, "not a tensor"),
    ],
)
def test_bad_input_raises_one_clear_error(kwargs: dict, needle: str) -> None:
    arguments = {"samples": [np.zeros((1, 3, 8, 8), np.float32)], "steps": 2, **kwargs}
    with pytest.raises(DistillConfigError) as caught:
        distill(TwoHeads(), TwoHeads(), **arguments)
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, ValueError)
    assert needle in str(caught.value)


def test_distilling_never_leaves_the_student_worse_than_it_was(digits: dict) -> None:
    """The student that did best on held-out samples is kept, the untrained one included: a student
    already equal to its teacher, or one trained with a learning rate that wrecks it, comes back as it
    was; a pruned one comes back better, at the checkpoint that did best."""
    import copy

    teacher, x_test = digits["teacher"], digits["x_test"]
    for student, lr in ((copy.deepcopy(teacher), 1e-3), (copy.deepcopy(teacher), 5.0)):
        before = {k: v.clone() for k, v in student.state_dict().items()}
        result = distill(student, teacher, [digits["calib"]], steps=40, batch_size=32, lr=lr)
        assert result.best_step == 0 and result.held_out[0][0] == 0
        assert all(torch.equal(before[k], v) for k, v in result.model.state_dict().items())
        assert min(loss for _, loss in result.held_out) == result.held_out[0][1]

    pruned = prune_model(teacher, torch.from_numpy(x_test[:1]), 0.3, "structured").model
    result = distill(pruned, teacher, [digits["calib"]], steps=100, batch_size=32)
    start, best = result.held_out[0][1], min(loss for _, loss in result.held_out)
    assert result.best_step > 0 and best < 0.5 * start
    assert [step for step, _ in result.held_out] == list(range(0, 101, 10))
    kl_after, _ = _kl_and_agreement(result.model, teacher, x_test)  # on images neither part saw
    assert (
        kl_after
        < 0.6
        * _kl_and_agreement(
            prune_model(teacher, torch.from_numpy(x_test[:1]), 0.3, "structured").model, teacher, x_test
        )[0]
    )


class StochasticDepth(torch.nn.Module):
    """A block that drops its residual branch in train mode through a plain function (no Dropout module),
    as EfficientNet's drop_connect does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv(x)
        if self.training:
            branch = branch * (torch.rand(x.shape[0], 1, 1, 1) > 0.5)
        return self.head(branch.mean(dim=(2, 3)))


def test_the_student_trains_as_it_is_exported_without_functional_dropout() -> None:
    """Train mode would switch on stochastic depth written as a function; the student trains in eval
    mode, so two students with identical weights see identical outputs at every step (losses equal)."""
    torch.manual_seed(0)
    teacher = StochasticDepth().eval()
    samples = [torch.randn(4, 1, 8, 8) for _ in range(4)]
    seen: list[bool] = []

    class Watching(StochasticDepth):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return super().forward(x)

    student = Watching()
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student.conv.weight.mul_(0.5)
    result = distill(student, teacher, samples, steps=6, batch_size=4, held_out=0)
    assert seen and not any(seen)
    assert result.losses[0] > 0


def test_a_time_budget_ends_training_and_patience_stops_early(digits: dict) -> None:
    teacher, x_test = digits["teacher"], digits["x_test"]
    pruned = prune_model(teacher, torch.from_numpy(x_test[:1]), 0.3, "structured").model
    result = distill(pruned, teacher, [digits["calib"]], steps=100_000, batch_size=32, budget_s=4.0)
    assert result.stopped == "budget" and 1 < result.steps < 100_000
    assert result.seconds < 4.0 + 5.0  # the last step and checkpoint after the budget at most
    assert result.best_step > 0  # the budgeted schedule trains (its warm-up is 5 % of the time)
    assert len(result.held_out) >= 3 and result.held_out[-1][0] == result.steps

    # a student equal to its teacher cannot improve: patience ends it long before the step count
    import copy

    same = distill(copy.deepcopy(teacher), teacher, [digits["calib"]], steps=400, batch_size=32, patience=2)
    assert same.stopped == "patience" and same.steps <= 120 and same.best_step == 0


def test_feature_loss_matches_blocks_that_keep_their_shape() -> None:
    torch.manual_seed(0)
    teacher = TwoHeads().eval()
    student = TwoHeads()
    samples = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    result = distill(student, teacher, samples, steps=10, lr=3e-3, batch_size=4, feature_weight=1.0)
    assert result.feature_layers == ["trunk.0", "trunk.1"]
    assert not student.trunk[0]._forward_hooks  # hooks removed
