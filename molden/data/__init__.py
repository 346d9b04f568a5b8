"""Records, readers, the HDF5 graph cache and batching."""

from molden.data.batch import Batch, collate
from molden.data.h5_dataset import H5Dataset
from molden.data.structure import Structure

__all__ = ["Batch", "H5Dataset", "Structure", "collate"]
