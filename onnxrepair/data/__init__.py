"""Data in: loaders for local files (npz, image folders, CIFAR batches, IDX, CSV) and the input contract
that turns raw values into model input."""

from .contract import InputContract  # noqa: F401
from .dataset import ArrayDataset  # noqa: F401
from .loaders import load_dataset  # noqa: F401


def __getattr__(name: str):
    if name == "ModelWithContract":  # a torch module: imported on first use, not with the package
        from ._torch_contract import ModelWithContract

        return ModelWithContract
    raise AttributeError(name)
