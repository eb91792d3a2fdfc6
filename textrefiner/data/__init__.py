"""Datasets in CoOp's layout, few-shot and base/novel splits, transforms and loaders."""

from textrefiner.data.base import (
    Datum,
    DatasetSplits,
    generate_fewshot,
    read_split_json,
    subsample_classes,
    write_split_json,
)
from textrefiner.data.datasets import DATASETS, build_dataset, read_dataset
from textrefiner.data.loader import ImageDataset, build_loader, read_image
from textrefiner.data.synthetic import synthetic_classnames, write_synthetic_dataset
from textrefiner.data.transforms import build_transform

__all__ = [
    "DATASETS",
    "Datum",
    "DatasetSplits",
    "ImageDataset",
    "build_dataset",
    "build_loader",
    "build_transform",
    "generate_fewshot",
    "read_dataset",
    "read_image",
    "read_split_json",
    "subsample_classes",
    "synthetic_classnames",
    "write_split_json",
    "write_synthetic_dataset",
]
