"""Torch dataset over `Datum` lists and the data loader built from cfg.DATALOADER."""

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from textrefiner.data.transforms import build_transform, replay_draws
from textrefiner.errors import OutputError, UserError


def read_image(path, size_only=False):
    """The image at `path` as RGB (or only its (width, height), read from its header); a UserError
    naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size if size_only else img.convert("RGB")
    except OSError as err:  # includes missing files and PIL.UnidentifiedImageError
        # errno set: the file system failed (permissions, a vanished folder): exit code 1
        error = OutputError if err.errno is not None else UserError
        raise error(
            f"Cannot read image {path} ({err}). Check the file, or prepare the dataset again."
        ) from err


class ImageDataset(Dataset):
    """Items as Dassl batches: {"img", "label", "domain", "impath", "index"}."""

    def __init__(self, items, transform=None):
        self.items = list(items)
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        img = read_image(item.impath)
        if self.transform is not None:
            img = self.transform(img)
        return {
            "img": img,
            "label": item.label,
            "domain": item.domain,
            "impath": item.impath,
            "index": index,
        }

    def draw_only(self, index):
        """Make the random draws that augmenting item `index` makes, without reading its pixels
        (distributed training replays the draws of the other ranks' images)."""
        if self.transform is not None:
            replay_draws(self.transform, read_image(self.items[index].impath, size_only=True))


def build_loader(
    items, cfg, is_train, batch_size, shuffle, sampler=None, generator=None, transform=None,
    share=None,
):
    """A DataLoader over `items` with build_transform(cfg, is_train) (unless `transform` given).

    As in Dassl, the last incomplete batch is dropped only in training with at least one full
    batch. Given a seeded `generator`, the shuffling and the worker seeds (hence the random
    augmentations when DATALOADER.NUM_WORKERS > 0) repeat; with 0 workers augmentations draw
    from the global torch RNG.

    share=(rank, world): this rank's share of the shuffled batches one process draws with batch
    size `batch_size * world`, each image augmented as that process augments it
    (textrefiner.distributed).
    """
    if not items:
        raise UserError(
            "The data split is empty: check DATASET.NAME, NUM_SHOTS and SUBSAMPLE_CLASSES"
        )
    if transform is None:
        transform = build_transform(cfg, is_train)
    dataset = ImageDataset(items, transform)
    if share is not None:
        return _share_loader(dataset, cfg, is_train, batch_size, generator, *share)
    if sampler is None and shuffle:
        sampler = RandomSampler(dataset, generator=generator)
    elif sampler is None:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        drop_last=is_train and len(items) >= batch_size,
        pin_memory=_pin_memory(cfg),
        generator=generator,
    )


def _pin_memory(cfg):
    return torch.cuda.is_available() and cfg.get("USE_CUDA", True)


def _share_loader(dataset, cfg, is_train, batch_size, generator, rank, world):
    from textrefiner.distributed import GlobalBatchSampler, RankShare, collate_share

    global_batch = batch_size * world
    batches = GlobalBatchSampler(len(dataset), global_batch,
                                 is_train and len(dataset) >= global_batch, generator, rank, world)
    return DataLoader(RankShare(dataset), batch_sampler=batches, collate_fn=collate_share,
                      num_workers=cfg.DATALOADER.NUM_WORKERS, pin_memory=_pin_memory(cfg),
                      generator=generator)
