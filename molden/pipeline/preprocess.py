"""`molden preprocess`: a data source into an HDF5 graph cache, streamed in blocks.

source → validated `Structure`s → batched radius graphs → `CacheWriter` (atomic, resumable).
Memory is bounded by one block, whatever the size of the source.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from molden import __version__
from molden.data.emt import EMTConfig
from molden.data.h5_writer import CacheWriter
from molden.data.splits import QM9_SPLIT, SplitConfig, assign_splits
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError
from molden.pipeline.structure_graphs import GraphReport, build_graphs

SourceName = Literal["qm9", "oc20", "pcqm4mv2", "ase", "emt"]

# ForceNet (§3) and the OC20 baselines use 6 Å on catalysts; 5 Å is the usual molecular choice.
DEFAULT_CUTOFF_ANGSTROM: dict[str, float] = {"qm9": 5.0, "pcqm4mv2": 5.0, "ase": 5.0, "oc20": 6.0, "emt": 6.0}

BLOCK_ATOMS = 65536
BLOCK_STRUCTURES = 4096

ProgressHook = Callable[[int, int | None], None]
"""Called with (done, total or None): structures written, or for `emt` systems relaxed."""


class PreprocessConfig(BaseModel):
    """Everything `molden preprocess` needs; the CLI builds one of these and nothing else."""

    model_config = ConfigDict(extra="forbid")

    source: SourceName
    out: Path
    inputs: list[Path] = Field(default_factory=list, description="files or folders to read (none for emt, optional for qm9)")
    cutoff_angstrom: float | None = Field(None, gt=0, description="radius-graph cutoff, Å (default per source)")
    max_num_neighbors: int | None = Field(None, ge=1, description="keep the nearest k neighbours (plus ties)")
    limit: int | None = Field(None, ge=1, description="stop after this many structures")
    workers: int = Field(1, ge=1, description="processes for EMT relaxations and torch threads for graphs")
    split: SplitConfig | None = None
    min_distance_angstrom: float = Field(0.1, ge=0, description="closer atoms are reported as overlapping")
    resume: bool = True
    emt: EMTConfig = Field(default_factory=EMTConfig)
    oc20_frames: Literal["all", "initial", "final"] = "all"
    pcqm4mv2_targets: Path | None = None

    @property
    def cutoff(self) -> float:
        return self.cutoff_angstrom if self.cutoff_angstrom is not None else DEFAULT_CUTOFF_ANGSTROM[self.source]


class PreprocessSummary(BaseModel):
    """What `run_preprocess` wrote."""

    path: Path
    source: str
    cutoff_angstrom: float
    n_structures: int
    n_atoms: int
    n_edges: int
    edges_per_atom: float
    edges_dropped_by_max_neighbors: int
    isolated_atoms: int
    structures_with_isolated_atoms: list[str]
    splits: dict[str, int]
    resumed_from: int
    seconds: float


def _check_inputs(config: PreprocessConfig) -> None:
    """Fail on missing inputs before the writer exists: it would replace a resumable partial
    file whose provenance (input paths) the typo changes."""
    if config.source == "emt" or (config.source == "qm9" and not config.inputs):
        return
    if not config.inputs:
        raise MoldenConfigError(f"source {config.source!r} needs at least one input file or folder")
    for path in config.inputs:
        if not Path(path).exists():
            raise MoldenInputError(path, "no such file or directory")


def _read_source(
    config: PreprocessConfig, writer: CacheWriter, progress: ProgressHook | None
) -> tuple[Iterator[Structure], int | None]:
    """The source's structures after those the writer already holds (sources are deterministic,
    so this resumes exactly), and how many there are in all when cheap to know."""
    from molden.data import readers

    if config.source == "emt":
        from molden.data.emt import generate_emt, system_index

        emt = config.emt.model_copy(update={"workers": config.workers})
        last = writer.last_committed()
        # Systems are independent (seeded by index): restart at the last one written, not at
        # the first, so a resumed run relaxes only what is missing.
        resume_after = None if last is None else (system_index(last[0]), last[1])
        hook = None if progress is None else (lambda n: progress(n, emt.n_systems))
        return generate_emt(emt, progress=hook, resume_after=resume_after), None
    if config.source == "qm9" and not config.inputs:
        stream, total = readers.read_qm9(None), readers.count_qm9(None)
    else:
        if config.source == "qm9":
            streams = [readers.read_qm9(p) for p in config.inputs]
        elif config.source == "oc20":
            streams = [readers.read_oc20(p, frames=config.oc20_frames) for p in config.inputs]
        elif config.source == "pcqm4mv2":
            streams = [readers.read_pcqm4mv2(p, targets_csv=config.pcqm4mv2_targets) for p in config.inputs]
        else:
            streams = [readers.read_ase(p) for p in config.inputs]
        stream, total = itertools.chain.from_iterable(streams), None
    return itertools.islice(stream, writer.resumed_from, None), total


def _blocks(structures: Iterable[Structure]) -> Iterator[list[Structure]]:
    block: list[Structure] = []
    atoms = 0
    for s in structures:
        block.append(s)
        atoms += s.n_atoms
        if atoms >= BLOCK_ATOMS or len(block) >= BLOCK_STRUCTURES:
            yield block
            block, atoms = [], 0
    if block:
        yield block


@contextmanager
def _torch_threads(n: int):
    # Only raise the thread count: workers=1 (the default) keeps torch's own choice.
    before = torch.get_num_threads()
    torch.set_num_threads(max(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_split(source: str) -> SplitConfig:
    """QM9's documented split; files read through ASE are often sets of independent
    structures, so they split by structure; trajectories (oc20, emt) split by system."""
    if source == "qm9":
        return QM9_SPLIT
    return SplitConfig(group_by="structure" if source == "ase" else "system")


def provenance(config: PreprocessConfig) -> dict:
    """What the cache records about how it was made; also decides whether a resume matches."""
    return {
        "source": config.source,
        "inputs": [str(Path(p).resolve()) for p in config.inputs],
        "cutoff_angstrom": config.cutoff,
        "max_num_neighbors": config.max_num_neighbors,
        "config": config.model_dump(mode="json", exclude={"out", "resume", "workers"}),
        "molden_version": __version__,
    }


def run_preprocess(config: PreprocessConfig, progress: ProgressHook | None = None) -> PreprocessSummary:
    """Read `config.source`, build graphs and write `config.out` atomically; resumable."""
    start = time.perf_counter()
    where = ", ".join(str(p) for p in config.inputs) or config.source
    split = config.split or default_split(config.source)
    _check_inputs(config)
    writer = CacheWriter(config.out, provenance(config), resume=config.resume)
    report = GraphReport()
    try:
        structures, total = _read_source(config, writer, progress)
        if config.limit is not None:
            structures = itertools.islice(structures, max(config.limit - writer.resumed_from, 0))
            total = config.limit if total is None else min(total, config.limit)
        # emt reports systems relaxed itself; other sources report structures written.
        progress_structures = progress if config.source != "emt" else None
        done = writer.resumed_from
        if progress_structures:
            progress_structures(done, total)
        with _torch_threads(config.workers):
            for block in _blocks(structures):
                with_graphs, block_report = build_graphs(
                    block, config.cutoff, max_num_neighbors=config.max_num_neighbors,
                    min_distance_angstrom=config.min_distance_angstrom, where=where,
                )
                report.add(block_report)
                writer.write(with_graphs, where)
                done += len(block)
                if progress_structures:
                    progress_structures(done, total)
        n_structures, n_atoms, n_edges = writer.n_structures, writer.n_atoms, writer.n_edges
        extra = {
            "edges_dropped_by_max_neighbors": report.edges_dropped_by_max_neighbors,
            "isolated_atoms": report.isolated_atoms,
        }
        path = writer.finalize(lambda ids, index: assign_splits(ids, index, split), extra)
    except KeyboardInterrupt:
        writer.close()  # keep the partial file: the same command resumes from it
        raise
    except BaseException:
        writer.abort()
        raise

    from molden.data.h5_dataset import H5Dataset

    dataset = H5Dataset(path, in_memory_bytes=0)
    splits = {name: len(H5Dataset(path, name, in_memory_bytes=0)) for name in dataset.split_names}
    return PreprocessSummary(
        path=path,
        source=config.source,
        cutoff_angstrom=config.cutoff,
        n_structures=n_structures,
        n_atoms=n_atoms,
        n_edges=n_edges,
        edges_per_atom=n_edges / max(n_atoms, 1),
        edges_dropped_by_max_neighbors=report.edges_dropped_by_max_neighbors,
        isolated_atoms=report.isolated_atoms,
        structures_with_isolated_atoms=report.structures_with_isolated_atoms,
        splits=splits,
        resumed_from=writer.resumed_from,
        seconds=time.perf_counter() - start,
    )
