"""Train RDD's frozen feature classifier on labeled images (an .npz with arr_1 labels, or a folder of
<label>_*.png files):

    python scripts/classifier_train.py --data_dir cifar10_train.npz --model densenet201 \
        --output model/classifier.pt [--epochs 200 --batch_size 128 --lr 0.1 --image_size 32]

Any timm model name works (`pretrained=False`, nothing downloaded); DenseNet/ResNet stems are adapted to
small images. The file holds the weights and how to rebuild them (step_distill.classifier_path reads it).
`--layout rdd --model densenet201` trains RDD's own CIFAR DenseNet instead and writes its ckpt.pt layout
(the authors' `classifier/train.py --model densenet201`; scripts/rcfd_train.py reads it), on images in
[-1, 1] as RDD feeds them (the authors trained theirs on mean/std-normalised images).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import argparse
import json
import os

import torch

from guided_diffusion import logger
from guided_diffusion.distill.classifier import build_classifier, save_classifier, train_classifier
from guided_diffusion.distill.densenet import build_densenet, save_densenet
from guided_diffusion.image_datasets import load_data
from guided_diffusion.run_setup import seed_everything


def main(argv: list[str] | None = None) -> None:
    """Parse flags, train the classifier on the labeled data, write it to --output."""
    parser = argparse.ArgumentParser(description="Train the classifier of RDD's relational loss.")
    parser.add_argument("--data_dir", required=True, help="an .npz (arr_0 images, arr_1 labels) or a folder")
    parser.add_argument("--model", default="densenet201", help="timm name (--layout rdd: densenet121..201)")
    parser.add_argument("--layout", choices=("timm", "rdd"), default="timm",
                        help="rdd: RDD's own CIFAR DenseNet, saved as its ckpt.pt ({'model': state_dict})")
    parser.add_argument("--model_kwargs", default="{}", help="JSON keyword arguments for timm.create_model")
    parser.add_argument("--output", default="model/classifier.pt")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        parser.exit(2, f"{parser.prog}: error: --model_kwargs is not JSON: {exc}\n")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    logger.configure(out_dir, format_strs=["stdout"])
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.layout == "rdd":
        try:
            model = build_densenet(args.model, args.num_classes)
        except ValueError as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
    else:
        model = build_classifier(args.model, args.num_classes, args.image_size, model_kwargs)
    data = load_data(
        data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size, class_cond=True,
        seed=args.seed, shard=0, num_shards=1,
    )
    train_classifier(
        model, data, num_classes=args.num_classes, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, device=device,
    )
    if args.layout == "rdd":
        save_densenet(model, args.output)
    else:
        save_classifier(
            model, args.output, model_name=args.model, num_classes=args.num_classes,
            image_size=args.image_size, model_kwargs=model_kwargs,
        )
    logger.log(f"saved classifier to {args.output}")


if __name__ == "__main__":
    main()
