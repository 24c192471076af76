import math

import torch
import torch.nn.functional as F

import common


def test_kd_loss_matches_a_hand_computed_value():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    T, alpha = 3.0, 0.7
    kl = 0.0
    for i in range(4):
        p = [math.exp(v / T) for v in t[i].tolist()]
        q = [math.exp(v / T) for v in s[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = sum(-math.log(math.exp(s[i, y[i]].item()) / sum(math.exp(v) for v in s[i].tolist()))
             for i in range(4)) / 4
    expected = alpha * T * T * kl / 4 + (1 - alpha) * ce
    assert abs(common.kd_loss(s, t, y, T, alpha).item() - expected) < 1e-5


def test_alpha_zero_is_cross_entropy_and_one_is_scaled_kl():
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 11), torch.randn(8, 11), torch.randint(0, 11, (8,))
    assert torch.allclose(common.kd_loss(s, t, y, 20.0, 0.0), F.cross_entropy(s, y))
    kl = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
    assert torch.allclose(common.kd_loss(s, t, y, 4.0, 1.0), 16 * kl)


def test_teacher_gets_no_gradient_and_student_does():
    torch.manual_seed(2)
    teacher, student = common.make_teacher(3), common.StudentNet(num_classes=3)
    loss_fn = common.distill_loss(common.InlineTeacher(teacher, "none"), 4.0, 0.5)
    x = torch.rand(4, 3, 32, 32)
    student.train()
    batch = common.Batch(x, torch.tensor([0, 1, 2, 0]), torch.arange(4), 0)
    loss = loss_fn(student(common.normalize(x, "imagenet")), batch)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(p.grad is not None for p in student.parameters())
