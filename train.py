"""Train (or evaluate) a binary network: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                        # the original's model on bundled MNIST, CPU
    python train.py binarization=full_binary scale=channel optimizer=adam scheduler=step
    python train.py experiment=seed_resnet18_imagenet data.root=/data/imagenet
    python train.py -m +sweep=binarization                 # ablation sweep
    python train.py train=false ckpt_path=RUN/checkpoints/best.pt   # evaluate a checkpoint

Returns ``best/val/top1`` (percent) so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xnorpp.run import train

    results = train(cfg)
    metric = results.get("best/val/top1") if cfg.train else results.get("val/top1")
    return None if metric is None else float(metric)


if __name__ == "__main__":
    main()
