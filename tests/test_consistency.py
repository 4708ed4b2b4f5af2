"""The mean teacher (bonescan_model/consistency.py): the teacher follows the student by its
EMA, views are perturbed and mirrored back, the consistency term, and a checkpoint that
brings the teacher back as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bonescan_model import engine
from bonescan_model.checkpoint import read_file
from bonescan_model.consistency import MeanTeacher, flipped_forward, perturb, rampup
from bonescan_model.loss import SemiSupervisedLoss, consistency_loss
from bonescan_model.network import ModelConfig, build_model

TINY = ModelConfig(width=4, recurrence=1, dilations=(1, 2))


def _batch(b=4, size=32, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 10:13, 14:17] = 1
    image = (0.3 + 0.1 * torch.rand(b, 2, size, size, generator=gen) + mask).clamp(0, 2)
    return {"image": image, "mask": mask, "labeled": torch.tensor([True, False] * (b // 2))}


def test_the_teacher_follows_the_student_by_its_ema():
    student = nn.Sequential(nn.Conv2d(2, 1, 1), nn.BatchNorm2d(1))
    teacher = MeanTeacher(student, decay=0.75)
    # The decay ramps up as min(decay, 1 - 1/(t + 1)): 0, 1/2, 2/3, then 0.75 from there on.
    assert [teacher.decay_now() for teacher.steps in range(5)] == [0.0, 0.5, pytest.approx(2 / 3), 0.75, 0.75]
    teacher.steps = 0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)  # the first update: the teacher becomes the student
    for mine, theirs in zip(teacher.model.parameters(), student.parameters()):
        torch.testing.assert_close(mine, theirs)
    teacher.steps = 10  # past the ramp
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    teacher.update(student)
    for old, mine, theirs in zip(before, teacher.model.parameters(), student.parameters()):
        torch.testing.assert_close(mine, 0.75 * old + 0.25 * theirs)
        assert not mine.requires_grad
    assert teacher.model[1].running_mean.item() == 3.0  # buffers are the student's
    assert teacher.steps == 11 and teacher.state_dict()["steps"] == 11
    with pytest.raises(ValueError, match="decay"):
        MeanTeacher(student, decay=1.0)


def test_the_student_trains_as_its_control_does_and_differs_by_the_consistency_term_alone():
    # With the consistency term weighted 0, an epoch with a teacher moves the student exactly as
    # the supervised-only control's epoch does: the perturbation is on the teacher's side only.
    def student_after(teacher: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        student = build_model(TINY)
        loss_fn = SemiSupervisedLoss(semi="mean_teacher" if teacher else "chan_vese", supervised="dice_ce",
                                     unsupervised_weight=0.0)
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
        engine.train_epoch(student, [_batch(), _batch(seed=1)], loss_fn, optimizer,
                           teacher=MeanTeacher(student) if teacher else None)
        return [p.detach().clone() for p in student.parameters()]

    for with_teacher, control in zip(student_after(True), student_after(False), strict=True):
        torch.testing.assert_close(with_teacher, control)


def test_a_mirrored_view_is_mirrored_back():
    # A mirror-symmetric model (a 1x1 convolution) gives the same logits whichever images are mirrored.
    model = nn.Conv2d(2, 1, 1)
    image = torch.rand(3, 2, 8, 8)
    flip = torch.tensor([True, False, True])
    torch.testing.assert_close(flipped_forward(model, image, flip), model(image))
    # and a model that is not (a 1x3 kernel) sees the mirrored images mirrored
    model = nn.Conv2d(2, 1, (1, 3), padding=(0, 1))
    got = flipped_forward(model, image, flip)
    torch.testing.assert_close(got[0], model(image[:1].flip(-1)).flip(-1)[0])
    torch.testing.assert_close(got[1], model(image[1:2])[0])


def test_perturb_keeps_the_range_and_is_seeded():
    image = torch.rand(2, 2, 16, 16) * 2
    a = perturb(image, torch.Generator().manual_seed(1))
    b = perturb(image, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == image.shape
    assert a.min() >= 0 and a.max() <= 2 and not torch.equal(a, image)


def test_rampup_rises_to_one():
    values = [rampup(e, 4) for e in range(6)]
    assert values[0] == pytest.approx(torch.exp(torch.tensor(-5 * 0.75**2)).item())
    assert all(a < b for a, b in zip(values[:4], values[1:4])) and values[3:] == [1.0, 1.0, 1.0]
    assert rampup(0, 0) == 1.0


def test_consistency_known_values_and_no_gradient_to_the_teacher():
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)  # p = 0.5
    teacher = torch.full((1, 1, 2, 2), 1e4, requires_grad=True)  # p = 1
    got = consistency_loss(logits, teacher)
    assert got.item() == pytest.approx(0.25)
    got.sum().backward()
    assert teacher.grad is None and logits.grad.abs().sum() > 0
    loss = SemiSupervisedLoss(semi="mean_teacher", alpha=0.4, unsupervised_weight=2.0)
    mask, labeled = torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.bool)
    out = loss(logits, mask, mask, labeled, teacher_logits=teacher, unsupervised_scale=0.5)
    assert out["unsupervised"].item() == pytest.approx(0.25) and out["loss"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="teacher_logits"):
        loss(logits, mask, mask, labeled)


def test_a_mean_teacher_epoch_trains_every_student_parameter_and_moves_the_teacher():
    torch.manual_seed(0)
    student = build_model(TINY)
    teacher = MeanTeacher(student, decay=0.5)
    start = [p.clone() for p in teacher.model.parameters()]
    loss_fn = SemiSupervisedLoss(semi="mean_teacher", supervised="active_contour_normalized")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    seen = {n: False for n, _ in student.named_parameters()}

    def record():
        for n, p in student.named_parameters():
            seen[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)

    hook = optimizer.register_step_pre_hook(lambda *_: record())
    stats = engine.train_epoch(student, [_batch(), _batch(seed=1)], loss_fn, optimizer, teacher=teacher)
    hook.remove()
    assert all(seen.values()), [n for n, ok in seen.items() if not ok]
    assert stats["images"] == 8 and stats["unsupervised"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(start, teacher.model.parameters()))


def test_a_checkpoint_brings_the_teacher_back(tmp_path):
    from ray.train import Checkpoint

    from bonescan_model.train_config import TrainConfig
    from bonescan_platform.harness import restore, write_state
    from bonescan_platform.segmentation import load_state, save_state

    def checkpoint(teacher):
        extra = save_state(student, optimizer, cfg, {"epoch": 3}, teacher, "student", tmp_path)
        write_state(tmp_path, 3, [{"epoch": 3}], extra)
        return Checkpoint.from_directory(str(tmp_path))

    cfg = TrainConfig.from_dict({"model": {"width": 4, "recurrence": 1, "dilations": [1, 2]}, "semi": "mean_teacher"})
    student = build_model(cfg.model)
    teacher = MeanTeacher(student, decay=cfg.ema_decay)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(torch.randn_like(p))
    teacher.steps = 37  # where its decay's ramp-up stands comes back too
    optimizer = torch.optim.Adam(student.parameters())
    fresh_student = build_model(cfg.model)
    fresh = MeanTeacher(fresh_student, decay=cfg.ema_decay)
    epoch, history = restore(checkpoint(teacher), lambda folder, state: load_state(
        fresh_student, torch.optim.Adam(fresh_student.parameters()), fresh, folder, state))
    assert epoch == 3 and history[-1]["resumed"] is True and fresh.steps == 37
    for a, b in zip(teacher.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    # a checkpoint without a teacher cannot be a mean-teacher run's
    with pytest.raises(ValueError, match="no mean teacher"):
        restore(checkpoint(None), lambda folder, state: load_state(
            fresh_student, torch.optim.Adam(fresh_student.parameters()), fresh, folder, state))


def test_the_ema_teacher_beats_a_noisy_student_on_a_toy_problem():
    # y = x w with noisy steps at a large learning rate: the student jitters around w, and its
    # exponential average (Polyak averaging) averages the jitter out, so on clean data the
    # teacher's error is the smaller one: what keeping the teacher rests on.
    torch.manual_seed(0)
    true_w = torch.randn(8, 1)
    student = torch.nn.Linear(8, 1, bias=False)
    teacher = MeanTeacher(student, decay=0.95)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.2)
    for _ in range(400):
        x = torch.randn(4, 8)
        loss = ((student(x) - (x @ true_w + 0.5 * torch.randn(4, 1))) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update(student)
    x = torch.randn(2000, 8)
    with torch.no_grad():
        errors = {name: ((net(x) - x @ true_w) ** 2).mean().item() for name, net in
                  (("student", student), ("teacher", teacher.model))}
    assert errors["teacher"] < 0.5 * errors["student"], errors


class _Shard:
    """What validation reads: anything with Ray Data's iter_torch_batches."""

    def __init__(self, batch: dict):
        self.batch = batch

    def iter_torch_batches(self, batch_size: int):
        return iter([self.batch])


def _constant(model, logit: float):
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(logit)
    return model


@pytest.mark.parametrize("teacher_logit, kept", [(10.0, "teacher"), (-10.0, "student")])
def test_validation_keeps_whichever_of_student_and_teacher_scores_higher(teacher_logit, kept, tmp_path):
    from bonescan_model.train_config import TrainConfig
    from bonescan_platform.harness import write_state
    from bonescan_platform.segmentation import load_state, save_state, validate

    cfg = TrainConfig.from_dict({"model": {"width": 4, "recurrence": 1, "dilations": [1, 2]}, "semi": "mean_teacher"})
    torch.manual_seed(0)
    student = _constant(build_model(cfg.model), 0.0)  # half-way: a few pixels either side
    teacher = MeanTeacher(student, decay=cfg.ema_decay)
    _constant(teacher.model, teacher_logit)  # +10: every pixel a lesion; -10: none
    student = _constant(student, -10.0 if teacher_logit > 0 else 10.0)
    mask = torch.ones(1, 1, 32, 32)  # every pixel a lesion: "all" scores 1, "none" 0
    shard = _Shard({"image": torch.rand(1, 2, 32, 32), "mask": mask, "labeled": torch.tensor([True])})
    chosen, scores = validate(student, teacher, shard, cfg, "cpu")
    assert chosen == kept and scores["kept_weights"] == kept
    assert scores["val_dsc"] == max(scores["val_student_dsc"], scores["val_teacher_dsc"]) == 1.0
    # The checkpoint's model.pt holds the kept weights (what evaluate and predict load); resuming
    # takes the student's own weights back from the state, whichever was kept.
    optimizer = torch.optim.Adam(student.parameters())
    extra = save_state(student, optimizer, cfg, {"epoch": 1, **scores}, teacher, chosen, tmp_path)
    write_state(tmp_path, 1, [{"epoch": 1}], extra)
    saved = read_file(tmp_path / "model.pt")
    source = teacher.model if kept == "teacher" else student
    assert saved["meta"]["kept_weights"] == kept
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in source.state_dict().items())
    fresh = build_model(cfg.model)
    load_state(fresh, torch.optim.Adam(fresh.parameters()), MeanTeacher(fresh, decay=cfg.ema_decay), tmp_path,
               read_file(tmp_path / "train_state.pt"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in student.state_dict().items())
