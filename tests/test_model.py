import re

import pytest
import torch

import common
from support import images, running


def test_course_student_has_256779_parameters_and_its_names():
    model = common.StudentNet()
    assert common.count_params(model) == 256_779
    sd = model.state_dict()
    assert sd["cnn.0.0.weight"].shape == (16, 3, 3, 3)
    assert sd["cnn.1.0.weight"].shape == (16, 1, 3, 3)          # depthwise
    assert sd["cnn.1.3.weight"].shape == (32, 16, 1, 1)         # pointwise
    assert sd["cnn.7.3.weight"].shape == (256, 256, 1, 1)
    assert sd["fc.0.weight"].shape == (11, 256)
    assert isinstance(model.cnn[8], torch.nn.AdaptiveAvgPool2d)
    pools = [i for i in range(8) if isinstance(model.cnn[i][-1], torch.nn.MaxPool2d)]
    assert pools == [0, 1, 2, 3]
    assert len([k for k in sd if k.endswith("num_batches_tracked")]) == 8


def test_forward_shapes_for_widths_classes_and_sizes():
    for kwargs, size in [({}, 32), ({"width_mult": 0.5, "num_classes": 10}, 64),
                         ({"base": 8, "num_classes": 3}, 48),
                         ({"widths": [4, 5, 6, 7, 8, 9, 10, 11], "num_classes": 2}, 40)]:
        model = common.StudentNet(**kwargs).eval()
        out = model(torch.rand(2, 3, size, size))
        assert out.shape == (2, kwargs.get("num_classes", 11))
    assert common.StudentNet(width_mult=0.5).widths == [16, 32, 64, 64, 128, 128, 128, 256]


def test_plain_state_dicts_are_recognised(tmp_path):
    student = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=5)
    assert common.arch_from_state_dict(student.state_dict()) == common.arch_of(student)
    teacher = common.make_teacher(7)
    assert common.arch_from_state_dict(teacher.state_dict()) == {"kind": "resnet18", "num_classes": 7}
    torch.save(student.state_dict(), tmp_path / "plain.bin")
    model, preprocess, _ = common.load_model(tmp_path / "plain.bin", plain_norm="none")
    assert model.widths == student.widths and preprocess == {"norm": "none", "resize": images.NATIVE}  # the course's convention, its scale too


def test_checkpoint_round_trip_keeps_arch_and_preprocessing(tmp_path):
    student = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=4)
    common.save_checkpoint(tmp_path / "s.pt", student, {"norm": "imagenet", "img_size": 32}, {"val_acc": 0.5})
    model, preprocess, metrics = common.load_model(tmp_path / "s.pt")
    assert model.widths == student.widths
    assert preprocess["img_size"] == 32 and metrics["val_acc"] == 0.5
    for k, v in student.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_a_checkpoint_of_an_unknown_kind_names_its_file(tmp_path):
    student = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=4)
    blob = common.checkpoint(student, {"norm": "imagenet"})
    torch.save({**blob, "arch": {**blob["arch"], "kind": "vgg"}}, tmp_path / "s.pt")
    for expect in (None, "student"):
        with pytest.raises(running.UserError, match=f"^{re.escape(str(tmp_path / 's.pt'))}: unknown model kind 'vgg'$"):
            common.load_model(tmp_path / "s.pt", expect)


def test_macs_of_the_student():
    # first conv: 16*3*9 per pixel at 32x32; the rest is smaller; the total is stable
    macs = common.count_macs(common.StudentNet(), 32)
    assert 1_500_000 < macs < 2_500_000
    assert common.count_macs(common.StudentNet(), 64) > 3.9 * macs
