"""The digits classifier behind FD-digits and class accuracy: a small CNN on the teacher's train split.

Input: [B, 1, 8, 8] images scaled to [−1, 1] (as ``data.load_digits_split``). ``features(x)`` is
the 64-d penultimate layer (post-ReLU) used for the Fréchet distance. Trained on noise-free
data with mild augmentation (±1-pixel shifts, small Gaussian noise) so that slightly imperfect
samples are still read the way a person would.

Reproduce the shipped weights (runtime/weights/digits_classifier.*)::

    python -m fewstep.training.classifier
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime.digits_net import WEIGHTS_DIR
from ..runtime.plan import atomic_write_bytes, atomic_write_text
from .data import load_digits_split

CLASSIFIER_FILE = "digits_classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 32
    feature_dim: int = 64
    epochs: int = 40
    batch: int = 64
    lr: float = 2e-3
    shift_p: float = 0.5  # probability of a random ±1-pixel shift (padding with background −1)
    noise_std: float = 0.05


class DigitsClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w * 4, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d penultimate activations (FD-digits' feature space)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8×8 → 4×4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 4×4 → 2×2
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x, cfg: ClassifierConfig, gen: torch.Generator):
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    keep = torch.rand(b, generator=gen) >= cfg.shift_p
    dx = torch.where(keep, torch.ones_like(dx), dx)
    dy = torch.where(keep, torch.ones_like(dy), dy)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(b)])
    return out + cfg.noise_std * torch.randn(out.shape, generator=gen)


def train_classifier(out_dir: str = WEIGHTS_DIR, seed: int = 0, config: ClassifierConfig | None = None,
                     progress: bool = False) -> str:
    """Train on the train split (deterministic for a seed); writes digits_classifier.safetensors + .json."""
    from safetensors.torch import save
    from tqdm import tqdm

    cfg = config or ClassifierConfig()
    x_train, y_train, x_test, y_test = load_digits_split()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitsClassifier(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=False)
    n = x_train.shape[0]
    steps_per_epoch = (n + cfg.batch - 1) // cfg.batch
    total = cfg.epochs * steps_per_epoch
    gen = torch.Generator()
    t0 = time.perf_counter()
    step = 0
    for epoch in tqdm(range(cfg.epochs), disable=not progress, desc="digits classifier"):
        gen.manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch):
            idx = perm[i:i + cfg.batch]
            for g in opt.param_groups:  # cosine decay to 0: the last epochs settle the weights
                g["lr"] = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(step / total * torch.pi)).item())
            loss = F.cross_entropy(model(_augment(x_train[idx], cfg, gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CLASSIFIER_FILE)
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    meta = {"format": "fewstep.digits-classifier/1", "config": asdict(cfg), "seed": seed,
            "test_accuracy": acc, "n_test": int(x_test.shape[0]), "wall_seconds": round(wall, 1),
            "torch": torch.__version__}
    atomic_write_text(path[: -len(".safetensors")] + ".json", json.dumps(meta, indent=1) + "\n")
    return path


_CACHE: dict[str, DigitsClassifier] = {}


def load_classifier(path: str | None = None) -> DigitsClassifier:
    """The classifier in eval mode (cached per path). None = the shipped weights."""
    from safetensors.torch import load_file

    path = path or os.path.join(WEIGHTS_DIR, CLASSIFIER_FILE)
    if os.path.isdir(path):
        path = os.path.join(path, CLASSIFIER_FILE)
    key = os.path.abspath(path)
    if key in _CACHE:
        return _CACHE[key]
    cfg_path = path[: -len(".safetensors")] + ".json"
    for p in (path, cfg_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"digits classifier file not found: {p}")
    with open(cfg_path) as f:
        meta = json.load(f)
    model = DigitsClassifier(ClassifierConfig(**meta["config"]))
    model.load_state_dict(load_file(path))
    model.eval().requires_grad_(False)
    _CACHE[key] = model
    return model


if __name__ == "__main__":
    p = train_classifier(progress=True)
    with open(p[: -len(".safetensors")] + ".json") as f:
        print(p, json.load(f)["test_accuracy"])
