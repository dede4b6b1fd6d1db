"""Split a folder of captcha images into train/valid/test folders (default 80/5/15, as upstream).

    python scripts/split_dataset.py                                   # archive -> archive_split
    python scripts/split_dataset.py --src data/clean --dst data/clean_split --ratios 0.8 0.05 0.15 --seed 0

The split is deterministic: files are sorted by name, then shuffled with `--seed`. Files are
copied (or hard-linked with --link). A non-empty destination is refused, so an earlier split is
never mixed with a new one.
"""
import argparse
import os
import random
import shutil
import sys
from typing import Dict, List, Sequence

SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class SplitError(Exception):
    pass


def plan_split(files: Sequence[str], ratios: Sequence[float], seed: int) -> Dict[str, List[str]]:
    """Assign files to train/valid/test: sorted, shuffled with `seed`, cut by `ratios` (sum 1)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise SplitError(f"--ratios must be three non-negative numbers that sum to 1 (got {list(ratios)})")
    files = sorted(files)
    random.Random(seed).shuffle(files)
    n_train = int(round(ratios[0] * len(files)))
    n_valid = int(round(ratios[1] * len(files)))
    return {"train": files[:n_train], "valid": files[n_train:n_train + n_valid], "test": files[n_train + n_valid:]}


def split_dataset(src: str, dst: str, ratios: Sequence[float] = (0.8, 0.05, 0.15), seed: int = 2023,
                  link: bool = False) -> Dict[str, int]:
    """Copy the images of `src` into `dst/{train,valid,test}`; returns the count of each split."""
    if not os.path.isdir(src):
        raise SplitError(f"source folder '{src}' does not exist; unpack the captcha images there or pass --src")
    files = [n for n in os.listdir(src) if n.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise SplitError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{src}'")
    if os.path.isdir(dst) and os.listdir(dst):
        raise SplitError(f"destination '{dst}' is not empty; remove it or pass another --dst")
    plan = plan_split(files, ratios, seed)
    for split, names in plan.items():
        os.makedirs(os.path.join(dst, split), exist_ok=True)
        for name in names:
            source, target = os.path.join(src, name), os.path.join(dst, split, name)
            os.link(source, target) if link else shutil.copyfile(source, target)
    return {split: len(names) for split, names in plan.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Split captcha images into train/valid/test folders.")
    parser.add_argument("--src", default="archive", help="folder with the images (default: archive)")
    parser.add_argument("--dst", default="archive_split", help="output folder (default: archive_split)")
    parser.add_argument("--ratios", nargs=3, type=float, default=[0.8, 0.05, 0.15], metavar=("TRAIN", "VALID", "TEST"))
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--link", action="store_true", help="hard-link instead of copying")
    args = parser.parse_args(argv)
    try:
        counts = split_dataset(args.src, args.dst, args.ratios, args.seed, args.link)
    except (SplitError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{split}={counts[split]}" for split in SPLITS), f"-> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
