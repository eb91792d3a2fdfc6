"""Our dataset readers in Dassl's DATASET_REGISTRY, as "TR_<Name>" (e.g. "TR_OxfordPets").

Each registered class reads through `textrefiner.data.build_dataset`, so few-shot draws, the
base/novel split and PromptKD's all-class training are the same as in the standalone engine.
The trainers map the dataset YAML's DATASET.NAME to these names, so the YAML files stay as they are.
"""
from dassl.data.datasets import DATASET_REGISTRY, DatasetBase
from dassl.data.datasets import Datum as DasslDatum

from textrefiner.data import DATASETS, build_dataset
from textrefiner.errors import UserError
from textrefiner.methods import method_class

from .base import DATASET_PREFIX, method_name_of, register_once


def to_dassl(items):
    """Our `Datum`s as Dassl's (which checks that every image file exists)."""
    if items is None:
        return None
    converted = []
    for item in items:
        try:
            converted.append(DasslDatum(impath=item.impath, label=item.label,
                                        domain=item.domain, classname=item.classname))
        except AssertionError:
            raise UserError(f"Image file not found: {item.impath}. Prepare the dataset again "
                            "(textrefiner-data) or check DATASET.ROOT.") from None
    return converted


def trains_on_all_classes(cfg) -> bool:
    """Whether the chosen trainer trains on all classes (PromptKD's base-to-novel protocol)."""
    method = method_name_of(cfg.TRAINER.NAME)
    return (method is not None and method_class(method).trains_on_all_classes
            and cfg.TRAINER.MODAL == "base2novel")


class TextRefinerDataset(DatasetBase):
    """A Dassl dataset over one of our readers; subclasses set `source_name`."""

    source_name = ""  # key of textrefiner.data.DATASETS

    def __init__(self, cfg):
        source_cfg = cfg.clone()
        source_cfg.defrost()
        source_cfg.DATASET.NAME = self.source_name
        splits = build_dataset(source_cfg, all_classes_for_training=trains_on_all_classes(cfg))
        super().__init__(train_x=to_dassl(splits.train_x), val=to_dassl(splits.val),
                         test=to_dassl(splits.test))
        # the class list of the splits, not one re-derived from the (few-shot) train items
        self._classnames = list(splits.classnames)
        self._lab2cname = splits.lab2cname
        self._num_classes = len(splits.classnames)


def register_datasets():
    """Register "TR_<Name>" for every reader; names already registered are left alone."""
    for name in DATASETS:
        cls = type(DATASET_PREFIX + name, (TextRefinerDataset,),
                   {"source_name": name, "__doc__": f"{name} read by textrefiner.data."})
        register_once(DATASET_REGISTRY, cls)


register_datasets()
