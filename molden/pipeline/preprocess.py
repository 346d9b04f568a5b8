"""`molden preprocess`: a data source into an HDF5 graph cache, streamed in blocks.

source → validated `Structure`s → batched radius graphs → `CacheWriter` (atomic, resumable).
Memory is bounded by one block, whatever the size of the source.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import h5py
import torch
from pydantic import BaseModel, ConfigDict, Field

from molden import __version__
from molden.data.emt import EMTConfig
from molden.data import h5_schema as S
from molden.data.h5_writer import CacheWriter, describe_differences, fingerprint
from molden.data.splits import QM9_SPLIT, NoTrainSplitError, SplitConfig, assign_splits, check_train_left
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError
from molden.pipeline.structure_graphs import GraphReport, build_graphs

SourceName = Literal["qm9", "oc20", "pcqm4mv2", "ase", "emt"]

# ForceNet (§3) and the OC20 baselines use 6 Å on catalysts; 5 Å is the usual molecular choice.
DEFAULT_CUTOFF_ANGSTROM: dict[str, float] = {"qm9": 5.0, "pcqm4mv2": 5.0, "ase": 5.0, "oc20": 6.0, "emt": 6.0}

BLOCK_ATOMS = 65536
BLOCK_STRUCTURES = 4096
# The first block is small and each next one twice as large (up to BLOCK_ATOMS), so progress
# and the cutoff's edge estimate come within a second, not after 65,536 atoms.
FIRST_BLOCK_ATOMS = 4096

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
    # Not part of the provenance (exclude): how to treat an existing output, not how it is made.
    overwrite: bool = Field(
        False, exclude=True, description="replace an existing cache, or a partial file of other settings"
    )
    emt: EMTConfig = Field(default_factory=EMTConfig)
    oc20_frames: Literal["all", "initial", "final"] = "all"
    oc20_references: Path | None = Field(None, description="oc20 .traj: system id → reference energy (eV), OC20's "
                                         "oc20_ref.pkl, a JSON object or CSV: adds reference_energy and adsorption_energy")
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
    reused: bool = Field(False, description="the output was already a complete cache of these settings")
    notes: list[str] = Field(default_factory=list, description="what happened to existing files")


def _check_inputs(config: PreprocessConfig) -> None:
    """Fail on missing inputs before the writer exists: it would replace a resumable partial
    file whose provenance (input paths) the typo changes."""
    if config.oc20_references is not None:
        if config.source != "oc20":
            raise MoldenConfigError(f"--oc20-references is for source oc20, not {config.source}")
        from molden.data.readers import read_reference_energies

        read_reference_energies(config.oc20_references)  # a bad file fails before anything is written
    if config.emt.md is not None and config.source != "emt":
        raise MoldenConfigError(f"--emt-md-temperature / --emt-md-frames are for source emt, not {config.source}")
    if config.source == "emt":
        if config.inputs:
            names = ", ".join(str(p) for p in config.inputs)
            raise MoldenConfigError(
                f"source 'emt' generates its structures and reads no input files (got {names}): "
                "drop them, or use source ase for files"
            )
        return
    if config.source == "qm9" and not config.inputs:
        return
    if not config.inputs:
        raise MoldenConfigError(f"source {config.source!r} needs at least one input file or folder")
    for path in config.inputs:
        if not Path(path).exists():
            raise MoldenInputError(path, "no such file or directory")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def _check_output(config: PreprocessConfig, provenance_json: str, settings_json: str) -> bool:
    """Check `config.out` before any work; True when it already is a complete cache of these
    settings (nothing to do). Refuses an output that is one of the inputs, a directory, a file
    that is not a molden cache, or a cache of other settings unless `config.overwrite`."""
    out = Path(config.out)
    for path in [*config.inputs, config.oc20_references, config.pcqm4mv2_targets]:
        if path is not None and _same_file(out, Path(path)):
            raise MoldenConfigError(f"--out {out} is one of the inputs: give the cache another path")
    if out.is_dir():
        raise MoldenConfigError(f"--out {out} is a directory: give a file path, such as {out / 'cache.h5'}")
    if not out.exists():
        return False
    try:
        with h5py.File(out, "r") as f:
            attrs = {key: f.attrs[key] for key in ("format", "complete", "schema_version", "provenance", "settings") if key in f.attrs}
    except OSError:
        attrs = {}
    if attrs.get("format") != S.FORMAT_NAME:
        raise MoldenConfigError(
            f"--out {out} exists and is not a molden cache: refusing to replace it (choose another path or remove it)"
        )
    if config.overwrite:
        return False
    complete = bool(attrs.get("complete", False)) and int(attrs.get("schema_version", -1)) == S.SCHEMA_VERSION
    # Caches written before the `settings` attribute kept the split inside the provenance.
    if complete and attrs.get("provenance") == provenance_json and attrs.get("settings", settings_json) == settings_json:
        return True
    if not complete:
        why = "an incomplete molden cache or one of another schema version"
    else:
        old = json.loads(attrs.get("provenance", "{}")) | json.loads(attrs.get("settings", "{}"))
        new = json.loads(provenance_json) | json.loads(settings_json)
        why = f"a molden cache made with other settings ({describe_differences(old, new)})"
    raise MoldenConfigError(f"--out {out} is {why}: pass --overwrite to replace it, or choose another --out")


def _existing_summary(config: PreprocessConfig, start: float) -> PreprocessSummary:
    from molden.data.cache_summary import summarize_cache

    cache = summarize_cache(config.out)
    return PreprocessSummary(
        path=config.out, source=cache.source, cutoff_angstrom=cache.cutoff_angstrom, n_structures=cache.n_structures,
        n_atoms=cache.n_atoms, n_edges=cache.n_edges, edges_per_atom=cache.edges_per_atom,
        edges_dropped_by_max_neighbors=cache.edges_dropped_by_max_neighbors, isolated_atoms=cache.isolated_atoms,
        structures_with_isolated_atoms=[], splits=cache.splits, resumed_from=0,
        seconds=time.perf_counter() - start, reused=True,
        notes=[f"{config.out} is already complete with these settings: nothing to do (--overwrite rebuilds it)"],
    )


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
            references = None if config.oc20_references is None else readers.read_reference_energies(config.oc20_references)
            streams = [readers.read_oc20(p, frames=config.oc20_frames, references=references) for p in config.inputs]
        elif config.source == "pcqm4mv2":
            streams = [readers.read_pcqm4mv2(p, targets_csv=config.pcqm4mv2_targets) for p in config.inputs]
        else:
            streams = [readers.read_ase(p) for p in config.inputs]
        stream, total = itertools.chain.from_iterable(streams), None
    return itertools.islice(stream, writer.resumed_from, None), total


def _blocks(structures: Iterable[Structure]) -> Iterator[list[Structure]]:
    block: list[Structure] = []
    atoms, limit = 0, FIRST_BLOCK_ATOMS
    for s in structures:
        block.append(s)
        atoms += s.n_atoms
        if atoms >= min(limit, BLOCK_ATOMS) or len(block) >= BLOCK_STRUCTURES:
            yield block
            block, atoms, limit = [], 0, limit * 2
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
    """What the cache records about how it was made; also decides whether a resume matches.

    The split settings are left out (the writer's `settings` hold them): splits are assigned
    only at finalize, so a run that stopped there (`NoTrainSplitError`) finishes from its
    partial file with other --val/--test.
    """
    exclude: dict = dict.fromkeys({"out", "resume", "workers", "split"}, True)
    if config.source != "emt":
        exclude["emt"] = True
    elif config.emt.md is None:
        exclude["emt"] = {"md": True}  # caches made before MD frames existed stay reusable
    return {
        "source": config.source,
        "inputs": [str(Path(p).resolve()) for p in config.inputs],
        # Paths alone would reuse (or resume) a cache after its input file was replaced.
        "input_files": [input_fingerprint(p) for p in config.inputs],
        "cutoff_angstrom": config.cutoff,
        "max_num_neighbors": config.max_num_neighbors,
        "config": config.model_dump(mode="json", exclude=exclude),
        "molden_version": __version__,
    }


def input_fingerprint(path: str | Path) -> list:
    """[name, size in bytes, mtime in ns] of a file, or of every file in a folder (recursive,
    sorted), so that a changed, added or removed input file changes the provenance."""
    path = Path(path)
    if not path.exists():
        return [str(path), None, None]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(path)) if path.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    return out


def _systems_at_most(config: PreprocessConfig) -> int | None:
    """An upper bound of the systems (and structures) the source yields, where cheap to know:
    `limit`, and the molecule count of QM9 (one system per molecule)."""
    bound = config.limit
    if config.source == "qm9":
        from molden.data.readers import count_qm9

        counts = [count_qm9(None)] if not config.inputs else [count_qm9(p) for p in config.inputs]
        if None not in counts:
            bound = sum(counts) if bound is None else min(bound, sum(counts))
    return bound


def _check_split(config: PreprocessConfig, split: SplitConfig) -> None:
    """Fail before any work on split settings that cannot work: held-out counts that take every
    system of a source whose size is bounded up front, or --val/--test for emt."""
    if config.source == "emt":
        default = default_split("emt")
        if config.split is not None and (split.val, split.test, split.group_by) != (default.val, default.test, default.group_by):
            raise MoldenConfigError(
                "emt assigns its own OC20-like splits (train, val_id, test_id, test_ood_*; EMTConfig.split_fractions): "
                "--val, --test and --split-by do not apply to it"
            )
        return
    n = _systems_at_most(config)
    if n is not None:
        check_train_left(split, n)


def run_preprocess(
    config: PreprocessConfig, progress: ProgressHook | None = None, notify: Callable[[str], None] | None = None
) -> PreprocessSummary:
    """Read `config.source`, build graphs and write `config.out` atomically; resumable.

    Checks inputs and output before any work: an existing complete cache of the same settings
    is returned as it is (`reused`); `notify` receives one-line notes (a partial file resumed
    or discarded) as they happen, which the summary's `notes` repeat."""
    start = time.perf_counter()
    where = ", ".join(str(p) for p in config.inputs) or config.source
    split = config.split or default_split(config.source)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        if notify is not None:
            notify(message)

    _check_inputs(config)
    _check_split(config, split)
    record = provenance(config)
    # The split is assigned at the end, so it decides whether a complete cache can be reused
    # but not whether a partial one resumes.
    settings = {"split": split.model_dump(mode="json")}
    if _check_output(config, fingerprint(record), fingerprint(settings)):
        summary = _existing_summary(config, start)
        for message in summary.notes:
            if notify is not None:
                notify(message)
        return summary
    writer = CacheWriter(
        config.out, record, resume=config.resume, overwrite=config.overwrite, settings=settings, notify=note
    )
    if writer.resumed_from:
        note(f"resuming {writer.partial} after {writer.resumed_from:,} structures")
    report = GraphReport()
    try:
        if writer.all_structures_written:  # an earlier run stopped in finalize: only that is left
            structures, total = iter(()), writer.n_structures
        else:
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
        if writer.n_structures:
            writer.close()  # keep the partial file: the same command resumes from it
        else:
            writer.abort()  # nothing committed: nothing worth resuming
        raise
    except NoTrainSplitError as error:
        writer.close()  # every structure is written: a rerun with other --val/--test only finalizes
        raise NoTrainSplitError(
            f"{error} (the {n_structures:,} structures read are kept in {writer.partial}: "
            "rerun with new --val/--test to finish without reading them again)"
        ) from None
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
        notes=notes,
    )
