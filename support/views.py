"""Training views: the augmentation that makes view v of training image i from (seed, v) alone
(a crop, a flip, a rotation, a colour jitter, and mixup or CutMix with a partner image), a whole
batch at once on uint8 tensors, so that any view can be rebuilt bit for bit without storing
pixels: the teacher bank's logits and the student's pixels are of the same picture."""
import dataclasses
import functools
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

# The random streams come from these libraries, whose generators may change between versions:
# a teacher bank keyed by them is never served pixels drawn by another version.
LIBRARIES = f"torch {torch.__version__}, numpy {np.__version__}"


def seed_of(*parts):
    """A 63-bit seed from its parts alone (stable across runs and machines)."""
    digest = hashlib.sha1("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def seeded(*parts):
    """A torch generator seeded from its parts alone."""
    return torch.Generator().manual_seed(seed_of(*parts))


@functools.lru_cache(maxsize=None)
def constant(values, device):
    """A small constant tensor on the device, made once: a tensor built from Python numbers on
    every batch is a copy from the host, which a GPU waits for. (A normal tensor even when first
    asked for under inference_mode, so that autograd may use it later.)"""
    with torch.inference_mode(False):
        return torch.tensor(values, device=device)


def draws_on(draws, device):
    """A view's draws on the images' device, moved once per epoch (not once per batch)."""
    return {k: v.to(device) for k, v in draws.items()}


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation: a random crop at the stored size, a horizontal flip, a rotation,
    a colour jitter and (mix) mixup or CutMix with a partner image. View v of image i is drawn
    from (seed, v) alone, its partner and mixing weight too, so it can be rebuilt bit for bit at
    any time without storing pixels (the teacher bank relies on that)."""
    crop: int
    rotate: float = 0.0
    jitter: float = 0.0
    seed: int = 0
    mix: str = "none"  # none, mixup (a weighted sum of two views) or cutmix (a box of the partner's view pasted in)
    mix_alpha: float = 1.0  # the own image's share is drawn from Beta(mix_alpha, mix_alpha)

    def draws(self, view, n, size, ranges=None):
        """The random choices of view `view` for each of n images stored at `size` px; crops
        start anywhere, or (native scale) within each image's ranges (lo, hi)."""
        gen = seeded(self.seed, "view", view)
        if ranges is None:
            off = torch.randint(0, size - self.crop + 1, (2, n), generator=gen)
        else:
            lo, hi = ranges
            off = lo + (torch.rand(2, n, generator=gen) * (hi - lo + 1)).long()
        return {"off": off,
                "flip": torch.rand(n, generator=gen) < 0.5,
                "angle": (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.rotate),
                "factors": 1 + (torch.rand(3, n, generator=gen) * 2 - 1) * self.jitter,
                **(self.mix_draws(view, n) if self.mix != "none" else {})}

    def mix_draws(self, view, n):
        """Each image's partner (any training image, itself included), the box CutMix pastes
        (top, left, height, width) and the share of the image's own pixels, from its own
        stream: turning mixing on leaves the other draws as they were."""
        rng = np.random.default_rng(seed_of(self.seed, "mix", view))
        partner = rng.integers(0, n, n)
        share = rng.beta(self.mix_alpha, self.mix_alpha, n)
        centre = rng.random((2, n)) * self.crop
        box = np.zeros((4, n), np.int64)
        if self.mix == "cutmix":  # a box of (1 - share) of the area, clipped at the edges (CutMix, Yun et al. 2019)
            half = self.crop * np.sqrt(1 - share) / 2
            lo = np.clip(np.round(centre - half), 0, self.crop).astype(np.int64)
            hi = np.clip(np.round(centre + half), 0, self.crop).astype(np.int64)
            box = np.concatenate([lo, hi - lo])
            share = 1 - box[2] * box[3] / self.crop ** 2
        return {"partner": torch.from_numpy(partner), "share": torch.from_numpy(share.astype(np.float32)),
                "box": torch.from_numpy(box)}

    def apply(self, images, idx, draws):
        """The views of images[idx] (floats in [0, 1], channels_last), the whole batch at once."""
        x = self.unmixed(images, idx, draws)
        if self.mix != "none":
            x = mix_batch(x, self.unmixed(images, draws["partner"][idx], draws), self.mix,
                          draws["share"][idx], draws["box"][:, idx])
        return x.contiguous(memory_format=torch.channels_last)

    def unmixed(self, images, idx, draws):
        x = to_float(crop_flip(images, idx, self.crop, draws["off"][:, idx], draws["flip"][idx]))
        if self.rotate:
            x = rotate_batch(x, draws["angle"][idx])
        if self.jitter:
            x = jitter_batch(x, draws["factors"][:, idx])
        return x

    def labels_of(self, labels, idx, draws):
        """What a loss needs of the labels of images[idx]'s views: (their labels, and on mixed
        views (the partners' labels, the own share) or None)."""
        if self.mix == "none":
            return labels[idx.to(labels.device)], None
        partner = draws["partner"][idx].to(labels.device)
        return labels[idx.to(labels.device)], (labels[partner], draws["share"][idx].to(labels.device))


def crop_flip(images, idx, crop, off, flip):
    """Per-image crop at offsets off (2 x n) and horizontal flip of images[idx], by one gather."""
    dev = images.device
    ar = torch.arange(crop, device=dev)
    rows = off[0, :, None].to(dev) + ar
    cols = off[1, :, None].to(dev) + torch.where(flip[:, None].to(dev), crop - 1 - ar, ar)
    return images[idx.to(dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


def to_float(batch_nhwc):
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1], channels_last in memory."""
    return batch_nhwc.permute(0, 3, 1, 2).float().div_(255)


def mix_batch(x, partner_x, mix, share, box):
    """Mixup: share * x + (1 - share) * partner_x; CutMix: partner_x inside each image's box."""
    if mix == "mixup":
        w = share.to(x.device).view(-1, 1, 1, 1)
        return x * w + partner_x * (1 - w)
    top, left, height, width = box.to(x.device)[:, :, None]
    ar = torch.arange(x.shape[-1], device=x.device)
    rows = (ar >= top) & (ar < top + height)
    cols = (ar >= left) & (ar < left + width)
    return torch.where((rows[:, :, None] & cols[:, None, :])[:, None], partner_x, x)


def rotate_batch(x, angle):
    """Rotate each image by its angle (radians) about its centre."""
    angle = angle.to(x.device)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Reflected, not black, corners: on black-cornered images the teacher's soft labels taught
    # the student less in our food101-10 runs.
    return F.grid_sample(x.contiguous(), grid, padding_mode="reflection", align_corners=False)


def jitter_batch(x, factors):
    """Brightness, contrast and saturation, scaled per image by factors (3 x n: b, c, s).

    Applied one after the other these are x*b, then (x-mean)*c+mean, then (x-grey)*s+grey;
    folded together they are one pass: A*x + B*grey(x) + C with per-image A, B, C.
    """
    b, c, s = factors.view(3, -1, 1, 1, 1).to(x.device)
    mean = exact_mean(x) * b
    grey = (x * constant((0.299, 0.587, 0.114), x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.addcmul(mean * (1 - c), x, s * b * c).add_(grey.mul_((1 - s) * b * c)).clamp_(0, 1)


def exact_mean(x):
    """Each image's mean (N x 1 x 1 x 1) of values in [0, 1], the same in any batch on any device.

    A float32 sum's order, so its last bit, depends on how many images share the batch, and a
    view must come out the same in any batch (the teacher bank relies on it); float64, which
    would hide that, does not exist on Apple GPUs. So each value is rounded to a multiple of
    2^-k, with k chosen so that an image's sum stays below 2^24: every partial sum is then an
    integer float32 holds exactly, and any order adds up to the same number. (The mean is off
    by at most 2^-(k+1), k = 6 at 224 px: a contrast jitter cannot show it.)"""
    k = math.floor(24 - math.log2(x[0].numel()))
    if k < 0:
        raise ValueError(f"images of {x[0].numel()} values are too large for an exact float32 mean")
    units = x.mul(2.0 ** k).round_()
    return units.sum(dim=(1, 2, 3), keepdim=True).div_(x[0].numel() * 2.0 ** k)
