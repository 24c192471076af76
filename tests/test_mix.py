"""Mixed views (mixup, CutMix): replayable bit for bit, labels mixed as the pixels, and with
mixing off the views of before."""
import hashlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
from support import settings
from conftest import REPO


def tiny_images(n=12, size=20):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen), torch.arange(n) % 3


def flat_images(n=12, size=20):
    """Image i is one flat grey of value 10 * i + 5: any pixel of a view tells whose it is."""
    values = torch.arange(n) * 10 + 5
    return values.view(n, 1, 1, 1).expand(n, size, size, 3).to(torch.uint8).contiguous(), values


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_view_is_the_same_in_any_batch(mix):
    images, labels = tiny_images()
    aug = common.Augment(16, rotate=15.0, jitter=0.2, seed=3, mix=mix)
    draws = aug.draws(1, len(labels), images.shape[1])
    whole = aug.apply(images, torch.arange(len(labels)), draws)
    for batch in common.train_batches(images, labels, 5, aug, epoch=4, view=1):
        for j, i in enumerate(batch.idx.tolist()):
            assert torch.equal(aug.apply(images, torch.tensor([i]), draws)[0], batch.x[j])
            assert torch.equal(whole[i], batch.x[j])
        partner = draws["partner"][batch.idx]
        assert torch.equal(batch.mix[0], labels[partner]) and torch.equal(batch.mix[1], draws["share"][batch.idx])


VIEW_HASH = """
import hashlib, sys, torch
sys.path.insert(0, {repo!r})
import common
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (12, 20, 20, 3), dtype=torch.uint8, generator=gen)
aug = common.Augment(16, rotate=15.0, jitter=0.2, seed=3, mix={mix!r}, mix_alpha=0.7)
x = aug.apply(images, torch.arange(12), aug.draws(2, 12, 20))
print(hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_view_is_rebuilt_the_same_after_a_restart(mix):
    images, _ = tiny_images()
    aug = common.Augment(16, rotate=15.0, jitter=0.2, seed=3, mix=mix, mix_alpha=0.7)
    here = aug.apply(images, torch.arange(12), aug.draws(2, 12, 20))
    other = subprocess.run([sys.executable, "-c", VIEW_HASH.format(repo=str(REPO), mix=mix)],
                           capture_output=True, text=True, check=True)
    assert other.stdout.strip() == hashlib.sha1(here.contiguous().numpy().tobytes()).hexdigest()


def test_mixup_weighs_the_two_views_by_the_share():
    images, values = flat_images()
    aug = common.Augment(16, seed=1, mix="mixup", mix_alpha=0.5)
    draws = aug.draws(0, 12, 20)
    x = aug.apply(images, torch.arange(12), draws)
    share, partner = draws["share"], draws["partner"]
    expected = (share * values + (1 - share) * values[partner]) / 255
    assert torch.allclose(x.mean(dim=(1, 2, 3)), expected, atol=1e-6)
    assert len(set(partner.tolist())) > 3 and 0 < share.min() and share.max() < 1
    assert (share < 0.5).any() and (share > 0.5).any()


def test_cutmix_pastes_a_box_of_the_partner_and_its_share_is_the_pixels_own_fraction():
    images, values = flat_images()
    aug = common.Augment(16, seed=2, mix="cutmix")
    for view in range(3):
        draws = aug.draws(view, 12, 20)
        x = aug.apply(images, torch.arange(12), draws)[:, 0] * 255
        for i in range(12):
            own = (x[i] - values[i]).abs() < 0.5
            j = draws["partner"][i]
            assert ((x[i] - values[j]).abs() < 0.5).logical_or(own).all()
            if j != i:
                assert own.float().mean().item() == pytest.approx(draws["share"][i].item(), abs=1e-6)
                top, left, height, width = draws["box"][:, i].tolist()
                assert not own[top:top + height, left:left + width].any()


def test_turning_mixing_on_changes_no_other_draw():
    plain = common.Augment(16, rotate=15.0, jitter=0.2, seed=3)
    mixed = common.Augment(16, rotate=15.0, jitter=0.2, seed=3, mix="cutmix")
    a, b = plain.draws(1, 12, 20), mixed.draws(1, 12, 20)
    assert set(a) == {"off", "flip", "angle", "factors"} and all(torch.equal(a[k], b[k]) for k in a)
    images, _ = tiny_images()
    assert torch.equal(plain.apply(images, torch.arange(12), a), mixed.unmixed(images, torch.arange(12), b))


def test_with_mixing_off_the_views_are_those_of_before():
    """Digests of the draws and of a crop-and-flip view, taken on the code before mixing came."""
    images, _ = tiny_images()
    draws = common.Augment(16, 15.0, 0.2, 3).draws(1, 12, 20)
    digest = hashlib.sha1()
    for k in ("off", "flip", "angle", "factors"):
        digest.update(draws[k].numpy().tobytes())
    assert digest.hexdigest()[:16] == "adfe1cd46a1fa52c"
    aug = common.Augment(16, seed=3)
    x = aug.apply(images, torch.arange(12), aug.draws(1, 12, 20))
    assert hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()[:16] == "cb87f0f9ce43e4bb"
    batch = next(common.train_batches(images, torch.arange(12) % 3, 4, aug, 0, 1))
    assert batch.mix is None and torch.equal(batch.main_labels(), batch.y)


def test_mix_alpha_keys_nothing_when_nothing_is_mixed():
    cfg = {"img_size": 16, "rotate": 0.0, "jitter": 0.0, "seed": 0, "mix": "none"}
    plain = common.augment_of(settings.Settings({**cfg, "mix_alpha": 1.0}))
    assert common.augment_of(settings.Settings({**cfg, "mix_alpha": 0.3})) == plain
    assert common.augment_of(settings.Settings({**cfg, "mix": "mixup", "mix_alpha": 0.3})).mix_alpha == 0.3


def test_labels_are_mixed_as_the_pixels():
    torch.manual_seed(0)
    logits, y, y2 = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 0, 4, 2, 3])
    share = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.9, 0.6])
    by_hand = [share[i] * F.cross_entropy(logits[i:i + 1], y[i:i + 1])
               + (1 - share[i]) * F.cross_entropy(logits[i:i + 1], y2[i:i + 1]) for i in range(6)]
    assert torch.allclose(common.label_loss(logits, y, (y2, share)), torch.stack(by_hand).mean())
    assert torch.equal(common.label_loss(logits, y), F.cross_entropy(logits, y))  # unmixed: as before, bit for bit
    t = torch.randn(6, 5)
    assert torch.allclose(common.kd_loss(logits, t, y, 4.0, 0.0, (y2, share)), torch.stack(by_hand).mean())
    batch = common.Batch(torch.zeros(6, 3, 4, 4), y, torch.arange(6), 0, (y2, share))
    assert batch.main_labels().tolist() == [0, 1, 0, 3, 4, 0]
    assert torch.allclose(common.cross_entropy()(logits, batch), torch.stack(by_hand).mean())
