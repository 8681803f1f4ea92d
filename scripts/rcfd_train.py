"""RCFD/RDD training on their pytorch-ddpm UNet: base model, PD stage or RDD stage, by the config's `method`.

    python scripts/rcfd_train.py --config yaml/cifar10_32/rcfd/CIFAR10_BASE.yaml --logdir logs/CIFAR10/1024 \
        --data_dir cifar10_train.npz                                      # train_base.py
    python scripts/rcfd_train.py --config yaml/cifar10_32/rcfd/CIFAR10_PD.yaml --logdir logs/CIFAR10/512 \
        --base_ckpt logs/CIFAR10/1024 --data_dir cifar10_train.npz          # PD.py (one halving stage)
    python scripts/rcfd_train.py --config yaml/cifar10_32/rcfd/CIFAR10_RDD.yaml --logdir logs/8to4/rdd \
        --base_ckpt logs/CIFAR10/8 --classifier_path classifier/result/cifar10/densenet201 \
        --data_dir cifar10_train.npz                                      # train_rdd.py (README flags)

The RDD README's lines work as written with this script in place of theirs (`./config` holds their flag
files; the stage is `--method`, or read from the flags: RDD with --feature/--loss_type, PD with --base_ckpt):

    python -m torch.distributed.launch --nproc_per_node=4 scripts/rcfd_train.py \
        --flagfile ./config/CIFAR10_PD.txt --gpu_id 0,1,2,3 --logdir ./logs/CIFAR10/512 \
        --base_ckpt ./logs/CIFAR10/1024

Without --data_dir the training images are torchvision's CIFAR-10 under --dataset_root (/data/dataset, the
authors' root; downloaded if absent). `--resume` continues a killed run in its logdir. Several GPUs:
`mpiexec -n N python scripts/rcfd_train.py ...` or the launcher above (batch_size is the global batch).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

import argparse
import os

from evaluations.cifar_npz import load_cifar10
from evaluations.npz_io import save_npz_atomic
from guided_diffusion import dist_util, logger
from guided_diffusion.distill.rcfd_run import CKPT_FILE, STATE_FILE, StageTrainer, dry_run, parse_flags
from guided_diffusion.image_datasets import load_data
from guided_diffusion.run_setup import claim_and_configure, join_process_group, run_script


def authors_cifar10(root: str) -> str:
    """The authors' training data when no --data_dir is given: torchvision's CIFAR-10 train split under
    `root` (downloaded if absent, their /data/dataset by default), packed once into root/cifar10_train.npz
    by rank 0 while the other ranks wait."""
    path = os.path.join(root, "cifar10_train.npz")
    if dist_util.is_main_process() and not os.path.isfile(path):
        import torchvision

        torchvision.datasets.CIFAR10(root=root, train=True, download=True)
        save_npz_atomic(path, load_cifar10(root, "train"))
    dist_util.barrier()
    return path


def main(argv: list[str] | None = None) -> None:
    """Parse flags, lock the logdir, build the stage and train it."""
    parser = argparse.ArgumentParser(description="Train an RCFD/RDD base model or a PD/RDD halving stage.")
    parser.add_argument("--resume", action="store_true", help=f"continue from <logdir>/{STATE_FILE}")
    args, flags = parse_flags(parser, argv, "yaml/cifar10_32/rcfd/CIFAR10_PD.yaml")
    if not flags["logdir"]:
        parser.exit(2, f"{parser.prog}: error: --logdir is empty\n")
    if not flags["data_dir"] and flags["img_size"] != 32:
        parser.exit(2, f"{parser.prog}: error: --data_dir is empty (an image folder or an .npz); only "
                    f"CIFAR-10 has the authors' default source\n")
    if args.resume and not os.path.isfile(os.path.join(flags["logdir"], STATE_FILE)):
        parser.exit(2, f"{parser.prog}: error: --resume: {flags['logdir']}/{STATE_FILE} does not exist\n")
    if not args.resume and os.path.isfile(os.path.join(flags["logdir"], CKPT_FILE)):
        message = f"{flags['logdir']} already holds a {CKPT_FILE}; pass --resume or another --logdir"
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    if args.dry_run:
        reads = {"--base_ckpt": flags["base_ckpt"] if flags["method"] != "base" else "",
                 "--classifier_path": flags["classifier_path"] if flags["feature"] else ""}
        dry_run(flags, reads)
    world = join_process_group(flags["seed"])
    if flags["batch_size"] % world:
        raise SystemExit(f"error: batch_size {flags['batch_size']} is not divisible by {world} ranks")
    flags["data_dir"] = flags["data_dir"] or authors_cifar10(flags["dataset_root"])
    claim_and_configure(flags["logdir"], args.resume, flags, flags["method"])
    data = load_data(
        data_dir=flags["data_dir"], batch_size=flags["batch_size"] // world, image_size=flags["img_size"],
        class_cond=flags["conditional"], random_flip=flags["random_flip"], seed=flags["seed"],
    )
    StageTrainer(flags, flags["logdir"], data, resume=args.resume).run()
    logger.log(f"done; {flags['logdir']}/ckpt.pt")


if __name__ == "__main__":
    run_script(main)
