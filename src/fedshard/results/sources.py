"""What `fedshard analyze` reads: one or more results files as one results frame.

Each file is read by results.read (pickle or CSV, 5- or 6-tuple key). With several files, every
run is labelled by its `source` (the file's stem, or a name given as NAME=FILE), which the
analysis treats as any other setting: a harness's run and fedshard's run of the same
configuration and seed are paired and compared ("does fedshard reproduce my numbers?"). Files
given one name are one source, parts of one study (the harness's random-init runs and its
layerwise run): their runs are compared like the runs of one file.

Files record different settings: a 5-tuple pickle knows five, a CSV every one. A setting that a
file does not record is, for its runs:
- enable_layerwise_swapping: off (a 5-tuple pickle, and every file from before the setting
  existed, had it off);
- any other: the value every other file's runs share, said in a note; where those runs differ in
  it, nothing could say which value a run had, and the files are refused.

Settings that do not apply are read as fedshard records them (config.ExperimentConfig): the
harness wrote layerwise swapping on for world size 1, where it does nothing, and fedshard's
run of that configuration has it off; they are one configuration. A run is left as written
where that would make it the same configuration and seed as another run of its file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedshard.core.config import ConfigError, ExperimentConfig, canonical
from fedshard.results.formats import ResultsError, read, settings_of

SOURCE = "source"
# A setting a file does not record -> the value its runs had (see the module's docstring).
UNRECORDED = {"enable_layerwise_swapping": False}


def parse_labels(items: Iterable[object], files: Sequence[str]) -> dict[str, str]:
    """--label NAME=FILE items -> {file: name}; FILE must be one of `files` (the --results-file
    values, compared as paths). A ResultsError names what is wrong."""
    given = {Path(f).resolve(): f for f in files}
    labels: dict[str, str] = {}
    for item in items:
        name, sep, file = str(item).partition("=")
        name = name.strip()
        if not sep or not name or not file.strip():
            raise ResultsError(f"--label {item!r}: expected NAME=FILE, e.g. --label harness=experiment_results.pkl")
        if Path(file.strip()).resolve() not in given:
            raise ResultsError(
                f"--label {item!r}: {file.strip()} is not one of the results files given "
                f"(--results-file {', '.join(map(str, files))})"
            )
        labels[given[Path(file.strip()).resolve()]] = name
    return labels


def source_names(files: Sequence[str], labels: dict[str, str]) -> list[str]:
    """Each file's source: its label, else its stem. Files labelled alike are one source; two
    files of one stem that no label tells apart are a ResultsError."""
    if len({Path(f).resolve() for f in files}) < len(files):
        raise ResultsError(f"a results file is given twice: {', '.join(map(str, files))}")
    stems = [Path(f).stem for f in files if f not in labels]
    if twice := sorted({s for s in stems if stems.count(s) > 1}):
        raise ResultsError(
            f"several results files are named {', '.join(twice)}; tell them apart with --label NAME=FILE"
        )
    return [labels.get(f) or Path(f).stem for f in files]


def _recorded(values: dict[str, object]) -> dict[str, object]:
    """One run's settings as fedshard records them (what does not apply canonicalised); a
    configuration fedshard would not run is left as written."""
    try:
        cfg = ExperimentConfig.from_mapping(values)
    except ConfigError:
        return values
    return {s: getattr(cfg, s) for s in values}


def _as_recorded(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with each run's settings as _recorded, where that makes it no duplicate of
    another run of the frame (see the module's docstring)."""
    settings = settings_of(frame)
    written = [tuple(run.values()) for run in frame[settings].drop_duplicates().to_dict("records")]
    recorded = {run: tuple(_recorded(dict(zip(settings, run))).values()) for run in written}
    counts = Counter(recorded.values())
    changes = {run: new for run, new in recorded.items() if new != run and counts[new] == 1}
    if not changes:
        return frame
    rows = [changes.get(run, run) for run in zip(*(frame[s].tolist() for s in settings))]
    return frame.assign(
        **{
            s: pd.Series([row[i] for row in rows], index=frame.index, dtype=frame[s].dtype)
            for i, s in enumerate(settings)
        }
    )


def _fill(frames: dict[str, pd.DataFrame]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Every frame with every setting some frame records (UNRECORDED, else the others' one value),
    and a note for each file whose runs were given another file's value."""
    settings = [s for s in dict.fromkeys(s for f in frames.values() for s in settings_of(f))]
    notes: list[str] = []
    filled: dict[str, pd.DataFrame] = {}
    for name, frame in frames.items():
        taken: dict[str, Any] = {}  # Any: a cell of the other frames, of whatever type its column holds
        for s in (s for s in settings if s not in frame.columns):
            if s in UNRECORDED:
                frame = frame.assign(**{s: UNRECORDED[s]})
                notes.append(
                    f"{name} records no {s}: its runs are read as {s}={canonical(UNRECORDED[s])}, as a "
                    "5-tuple pickle, like any file from before the setting existed, holds runs without it"
                )
                continue
            values = {v for other in frames.values() if s in other.columns for v in other[s].tolist()}
            if len(values) > 1:
                raise ResultsError(
                    f"{name} records no {s}, and the runs of the other files differ in it "
                    f"({', '.join(map(str, sorted(values)))}): nothing says which its runs had; "
                    f"give the other files' runs of one {s} only (fedshard export --where {s}=...)"
                )
            taken[s] = values.pop()
        filled[name] = frame.assign(**taken)
        if taken:
            notes.append(
                f"{name} records no {', '.join(taken)}: its runs are taken to have the other files' "
                + ", ".join(f"{s}={canonical(v) or repr('')}" for s, v in taken.items())
            )
    return filled, notes


def read_sources(files: Iterable[str | Path], labels: Iterable[object] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The results frame of one or more results files, with a `source` column when they are
    several sources, and notes on what was assumed for settings a file does not record."""
    paths = [str(f) for f in files]
    names = source_names(paths, parse_labels(labels, paths))
    frames = {f: _as_recorded(read(f)) for f in paths}
    if len(frames) == 1:
        return next(iter(frames.values())), []
    frames, notes = _fill(frames)
    frame = pd.concat([f.assign(**{SOURCE: name}) for name, f in zip(names, frames.values())], ignore_index=True)
    keys = [*settings_of(frame), SOURCE, "round"]
    if (twice := frame.duplicated(keys)).any():
        row = frame.iloc[int(twice.argmax())]  # concat(ignore_index=True): the index is the rows' positions
        run = row[settings_of(frame)].to_dict()
        raise ResultsError(f"the run {run} is in more than one file of source {row[SOURCE]!r}")
    if len(set(names)) == 1:  # one source in several files: nothing to tell apart
        frame = frame.drop(columns=SOURCE)
    return frame, notes
