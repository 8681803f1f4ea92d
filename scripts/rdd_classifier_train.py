"""RDD's feature classifier trained with the authors' recipe (their `classifier/train.py`, same flags):

    python scripts/rdd_classifier_train.py --model densenet201    # their: python train.py --model densenet201

Recipe, as theirs: random crop (padding 4, fill 128), horizontal flip, AutoAugment's CIFAR-10 policy,
Cutout (one 16-pixel hole), mean/std normalisation (`--normalize05`: 0.5/0.5, i.e. the [-1, 1] images RDD
feeds the frozen classifier), SGD (momentum 0.9, weight decay 5e-4) with the learning rate divided by 10 at
50% and 75% of the epochs, the test-set accuracy after every epoch, and `<result_path>/<dataset>/<model>/
ckpt.pt` ({"model": state_dict}) rewritten whenever it improves; default result path ./classifier/result/,
where scripts/rcfd_train.py's `--classifier_path ./classifier/result/cifar10/densenet201` looks.
Data: torchvision's CIFAR-10 under --data_root (downloaded if absent), or --train_npz/--test_npz (arr_0
uint8 NHWC images, arr_1 labels). `scripts/classifier_train.py --layout rdd` is this project's shorter
recipe (cosine SGD, no augmentation, [-1, 1] inputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import argparse
import os

import numpy as np
import torch

from guided_diffusion import logger
from guided_diffusion.distill.classifier import train_with_test_selection
from guided_diffusion.distill.densenet import build_densenet, save_densenet
from guided_diffusion.run_setup import seed_everything

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the authors' normalisation


class Cutout:
    """Zero one `length` x `length` square (clipped at the border) at a uniformly drawn centre of a CHW
    tensor, per hole."""

    def __init__(self, n_holes: int = 1, length: int = 16) -> None:
        self.n_holes, self.length = n_holes, length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[1:]
        mask = torch.ones(h, w)
        for _ in range(self.n_holes):
            y, x = np.random.randint(h), np.random.randint(w)
            half = self.length // 2
            mask[max(0, y - half):min(h, y + half), max(0, x - half):min(w, x + half)] = 0.0
        return image * mask


class ArrayImages(torch.utils.data.Dataset):
    """uint8 NHWC images and labels from an npz, through PIL transforms like torchvision's datasets."""

    def __init__(self, path: str, transform) -> None:
        from PIL import Image

        with np.load(path) as data:
            if "arr_1" not in data.files:
                raise SystemExit(f"error: {path}: no arr_1 labels")
            self.images, self.labels = data["arr_0"], data["arr_1"].astype(np.int64)
        self.to_pil, self.transform = Image.fromarray, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.to_pil(self.images[i])), int(self.labels[i])


def transforms_for(size: int, normalize05: bool) -> tuple[object, object]:
    """The authors' train and test transforms for `size`-pixel images."""
    from torchvision import transforms

    mean, std = ((0.5,) * 3, (0.5,) * 3) if normalize05 else (CIFAR_MEAN, CIFAR_STD)
    norm = transforms.Normalize(mean, std)
    train = transforms.Compose([
        transforms.RandomCrop(size, padding=4, fill=128), transforms.RandomHorizontalFlip(),
        transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10), transforms.ToTensor(), Cutout(1, 16),
        norm,
    ])
    return train, transforms.Compose([transforms.ToTensor(), norm])


def main(argv: list[str] | None = None) -> None:
    """Parse the authors' flags, build the DenseNet and data, train, keep the best test-accuracy model."""
    p = argparse.ArgumentParser(description="Train RDD's classifier with the authors' recipe.")
    p.add_argument("--model", default="densenet201", help="densenet121/161/169/201")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10",))
    p.add_argument("--gpu_id", default="", help="CUDA_VISIBLE_DEVICES (unless already set)")
    p.add_argument("--epoch", type=int, default=300)
    p.add_argument("--seed", type=int, default=-1, help="-1: unseeded, as theirs")
    p.add_argument("--result_path", default="./classifier/result/")
    p.add_argument("--batchsize", type=int, default=128)
    p.add_argument("--init_lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--normalize05", action="store_true", help="normalise to [-1, 1] (RDD's input range)")
    p.add_argument("--data_root", default="./data", help="torchvision CIFAR-10 root (downloaded if absent)")
    p.add_argument("--train_npz", default="", help="ours: train images+labels npz instead of torchvision")
    p.add_argument("--test_npz", default="", help="ours: test images+labels npz (with --train_npz)")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--dry_run", action="store_true", help="check the flags and inputs, build the model, exit")
    args = p.parse_args(argv)
    if bool(args.train_npz) != bool(args.test_npz):
        p.exit(2, f"{p.prog}: error: --train_npz and --test_npz go together\n")
    for path in (args.train_npz, args.test_npz):
        if path and not os.path.isfile(path):
            p.exit(2, f"{p.prog}: error: {path} not found\n")
    try:
        with torch.device("meta"):
            build_densenet(args.model)
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    name = args.model + ("_normalize05" if args.normalize05 else "")  # their folder naming
    model_dir = os.path.join(args.result_path, args.dataset, name)
    if args.dry_run:
        print(f"dry run: {args.model}, {args.epoch} epochs, writes {model_dir}/ckpt.pt; nothing run")
        return
    if args.gpu_id:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.gpu_id)
    os.makedirs(model_dir, exist_ok=True)
    logger.configure(model_dir, format_strs=["stdout", "log"])
    if args.seed != -1:
        seed_everything(args.seed)
    if args.train_npz:
        size = int(np.load(args.train_npz)["arr_0"].shape[1])
        train_tf, test_tf = transforms_for(size, args.normalize05)
        train_set, test_set = ArrayImages(args.train_npz, train_tf), ArrayImages(args.test_npz, test_tf)
    else:
        import torchvision

        train_tf, test_tf = transforms_for(32, args.normalize05)
        cifar = torchvision.datasets.CIFAR10
        train_set = cifar(args.data_root, train=True, download=True, transform=train_tf)
        test_set = cifar(args.data_root, train=False, download=True, transform=test_tf)
    loader = torch.utils.data.DataLoader
    train = loader(train_set, batch_size=args.batchsize, shuffle=True, num_workers=args.num_workers)
    test = loader(test_set, batch_size=args.batchsize, shuffle=False, num_workers=args.num_workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_densenet(args.model).to(device)
    path = os.path.join(model_dir, "ckpt.pt")
    best = train_with_test_selection(model, train, test, epochs=args.epoch, lr=args.init_lr,
                                     weight_decay=args.wd, device=device,
                                     save_best=lambda m: save_densenet(m, path))
    logger.log(f"training finished, {args.epoch} epochs, best test accuracy {100 * best:.2f}%: {path}")


if __name__ == "__main__":
    main()
