"""Run a training script (under torchrun or mpiexec) and write each rank's digest of its trained weights, so a
multi-GPU run can show that every rank ends with the same student.

    torchrun --standalone --nproc_per_node 2 benchmarks/ranks_agree.py OUT scripts/image_kd.py --config ...

Writes OUT/rank<k>.sha256 (SHA-256 of the weights' bytes in parameter order) once the loop has finished.
"""

from __future__ import annotations

import hashlib
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.train_util import TrainLoop  # noqa: E402


def main() -> None:
    out = Path(sys.argv.pop(1))
    out.mkdir(parents=True, exist_ok=True)
    train = TrainLoop.run_loop

    def train_then_digest(loop: TrainLoop) -> None:
        train(loop)
        digest = hashlib.sha256()
        for p in loop.model.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
        (out / f"rank{dist_util.get_rank()}.sha256").write_text(digest.hexdigest() + "\n")

    TrainLoop.run_loop = train_then_digest
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
