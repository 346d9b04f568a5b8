"""Records, readers, the HDF5 graph cache, sampling and batching."""

from molden.data.batch import Batch, collate
from molden.data.dynamic_batches import DynamicBatchSampler
from molden.data.h5_dataset import H5Dataset
from molden.data.sampling import BlockShuffleSampler, RandomOrderSampler
from molden.data.structure import Structure

__all__ = [
    "Batch",
    "BlockShuffleSampler",
    "DynamicBatchSampler",
    "H5Dataset",
    "RandomOrderSampler",
    "Structure",
    "collate",
]
