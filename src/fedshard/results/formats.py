"""The results formats: the classic pickle, the CSV of `fedshard export --format csv`, and the
"results frame" that analysis works on.

    pickle: {(world_size, learning_rate, enable_swapping, rounds, seed):   # (int, float, bool, int, int)
                [(round, test_loss, test_accuracy), ...]}                   # (int, float, float), round 0 first
            or the harness's later 6-tuple key, (world_size, learning_rate, enable_swapping,
            enable_layerwise_swapping, rounds, seed), (int, float, bool, bool, int, int). A 5-tuple
            pickle is the format from before layerwise swapping: its runs had it off.
    CSV:    one row per run and round, the columns CSV_COLUMNS
    frame:  one row per run and round: setting columns (a subset of RESULT_SETTINGS that always
            holds the five KEY_SETTINGS), optional run_id, round, test_loss, test_accuracy,
            optional bytes_down, bytes_up, bytes_total (float, NaN where unknown)

Export writes the files and analysis reads them, both through this module, so the two can
never disagree about a format. `read` tells the formats apart by content, never by file name.
"""

from __future__ import annotations

import csv
import io
import math
import pickle
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pandas as pd

from fedshard.core.config import KEY_SETTINGS, RESULT_SETTINGS, ExperimentConfig, canonical
from fedshard.core.errors import FedshardError

# The classic results dict: key (settings, as KEY_FORMATS says) -> [(round, test_loss, test_accuracy), ...].
Results = dict[tuple[int | float | bool, ...], list[tuple[int, float, float]]]
# What analysis and export take: a classic results dict or a results frame (to_frame).
ResultsOrFrame = Results | pd.DataFrame
KEY_TYPES = (int, float, bool, int, int)
# The two key formats of the pickle: 5 (KEY_SETTINGS) and the harness's 6, layerwise swapping fourth.
KEY_FORMATS = {
    5: KEY_SETTINGS,
    6: ("world_size", "learning_rate", "enable_swapping", "enable_layerwise_swapping", "rounds", "seed"),
}
_KEY_TYPES = {5: KEY_TYPES, 6: (int, float, bool, bool, int, int)}
BYTES_COLUMNS = ("bytes_down", "bytes_up", "bytes_total")
CSV_COLUMNS = (*RESULT_SETTINGS, "run_id", "round", "test_loss", "test_accuracy", *BYTES_COLUMNS)
# What a CSV must hold to be a results CSV: enough for the classic pickle's content.
CSV_REQUIRED = (*KEY_SETTINGS, "round", "test_loss", "test_accuracy")
# Each setting's type ("int", "float", "bool", "str"), from the one description of an experiment.
# (config.py's annotations are postponed, so each field's type is the string it is written as.)
SETTING_TYPES = {f.name: str(f.type) for f in fields(ExperimentConfig) if f.name in RESULT_SETTINGS}
_COLUMN_TYPES = {
    **SETTING_TYPES,
    "run_id": "str",
    "round": "int",
    "test_loss": "float",
    "test_accuracy": "float",
    **{c: "bytes" for c in BYTES_COLUMNS},
}


class ResultsError(FedshardError):
    """The file is missing, empty or not a results pickle or CSV; message says which and why."""

    exit_code = 2


# --------------------------------------------------------------------------- the pickle


class _NoGlobalsUnpickler(pickle.Unpickler):
    # dict/list/tuple/int/float/bool have opcodes of their own, so a genuine
    # results pickle never names a global. Refusing every global means loading
    # a hostile file cannot import or call anything (os.system, eval, ...).
    def find_class(self, module: str, name: str) -> NoReturn:
        raise ResultsError(
            f"it refers to the global {module}.{name}, which is refused "
            "(a results pickle holds only dicts, lists, tuples, ints, floats and bools)"
        )

    def persistent_load(self, pid: object) -> NoReturn:
        raise ResultsError("it contains a persistent id, which is refused")


def _is_int(x: object) -> bool:
    # bool is a subclass of int, but True is not a world size or a round.
    return type(x) is int


def _is_number(x: object) -> bool:
    return type(x) in (int, float)


def _key_problem(key: object, size: int) -> str | None:
    """What is wrong with one key of a pickle whose keys have `size` fields (its first key's), or None."""
    if type(key) is not tuple or len(key) not in KEY_FORMATS:
        return f"key {key!r} is not a 5-tuple {KEY_SETTINGS} nor a 6-tuple {KEY_FORMATS[6]}"
    if len(key) != size:
        return f"key {key!r} has {len(key)} fields where the first key has {size}: one file holds one key format"
    for field, expected, value in zip(KEY_FORMATS[size], _KEY_TYPES[size], key):
        if type(value) is not expected:
            return f"key {key!r}: {field} is {type(value).__name__} {value!r}, expected {expected.__name__}"
    world_size, lr, rounds = key[0], key[1], key[-2]
    if world_size < 1:
        return f"key {key!r}: world_size must be >= 1"
    if not (math.isfinite(lr) and lr > 0):
        return f"key {key!r}: learning_rate must be a positive finite float"
    if rounds < 1:
        return f"key {key!r}: rounds must be >= 1"
    return None


def _entries_problem(entries: object) -> str | None:
    if type(entries) is not list or not entries:
        return (
            f"value is {type(entries).__name__} {entries!r:.60}, expected a non-empty "
            "list of (round, test_loss, test_accuracy) tuples"
        )
    for i, entry in enumerate(entries):
        if not (
            type(entry) is tuple
            and len(entry) == 3
            and _is_int(entry[0])
            and _is_number(entry[1])
            and _is_number(entry[2])
        ):
            return f"entry {i} is {entry!r:.60}, expected a tuple (round: int, test_loss: float, test_accuracy: float)"
        if i == 0 and entry[0] != 0:
            return f"entry 0 has round {entry[0]}, expected round 0 (before training) first"
        if i > 0 and entry[0] <= entries[i - 1][0]:
            return (
                f"entry {i} has round {entry[0]} after round {entries[i - 1][0]}, expected rounds strictly increasing"
            )
    return None


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ResultsError(f"{path}: no such results file")
    try:
        data = path.read_bytes()
    except OSError as e:  # a directory, no permission, ...
        raise ResultsError(f"{path}: cannot read the results file ({e.strerror})") from None
    if not data:
        raise ResultsError(f"{path}: the file is empty (0 bytes), not a results pickle")
    return data


def _unpickle(path: Path, data: bytes) -> Results:
    try:
        results = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except ResultsError as e:
        raise ResultsError(f"{path}: not a results pickle: {e}") from None
    except Exception as e:  # truncated/corrupt pickles raise many different types
        raise ResultsError(f"{path}: not a results pickle: cannot unpickle it ({type(e).__name__}: {e})") from None
    if type(results) is not dict:
        raise ResultsError(
            f"{path}: not a results pickle: it holds a {type(results).__name__}, "
            "expected a dict {(world_size, learning_rate, enable_swapping, rounds, seed): "
            "[(round, test_loss, test_accuracy), ...]}"
        )
    if not results:
        raise ResultsError(f"{path}: the results dict is empty (no experiments)")
    size = len(first) if type(first := next(iter(results))) is tuple else 0
    for key, entries in results.items():
        problem = _key_problem(key, size)
        if problem is None and (problem := _entries_problem(entries)) is not None:
            problem = f"key {key!r}: {problem}"
        if problem is not None:
            raise ResultsError(f"{path}: not a results pickle: {problem}")
    return results


def load_pickle(path: str | Path) -> Results:
    """Read and validate a results pickle; raise ResultsError saying what is wrong."""
    path = Path(path)
    return _unpickle(path, _read_bytes(path))


def plain(value: object) -> Any:
    """A numpy scalar as the Python value it holds (np.float64(1e-05) -> 1e-05, whose repr is the
    short one); anything else as is. (Any: a frame's cell, of whatever type its column holds.)"""
    return value.item() if isinstance(value, np.generic) else value


def frame_from_pickle(results: Results) -> pd.DataFrame:
    """The results frame of a classic results dict: its key's settings (five, or six with
    enable_layerwise_swapping), no run ids, no bytes."""
    settings = KEY_FORMATS[len(next(iter(results)))]
    rows = [(*key, *entry) for key, entries in results.items() for entry in entries]
    frame = pd.DataFrame(rows, columns=[*settings, "round", "test_loss", "test_accuracy"])
    return frame.astype(
        {
            **{s: _DTYPES[SETTING_TYPES[s]] for s in settings},
            "round": "int64",
            "test_loss": "float64",
            "test_accuracy": "float64",
        }
    )


def to_frame(results: ResultsOrFrame) -> pd.DataFrame:
    """A results frame from either a results frame (returned as is) or a classic results dict."""
    if isinstance(results, pd.DataFrame):
        return results
    if isinstance(results, dict):
        return frame_from_pickle(results)
    raise TypeError(f"expected a results dict or a results frame, got {type(results).__name__}")


def settings_of(frame: pd.DataFrame) -> list[str]:
    """The setting columns the frame holds, in RESULT_SETTINGS order."""
    return [s for s in RESULT_SETTINGS if s in frame.columns]


def differing(frame: pd.DataFrame, key_format: int = 5) -> dict[str, list[str]]:
    """The settings outside the pickle's key (KEY_FORMATS[key_format]) in which the runs of `frame`
    differ -> their values (canonical strings, in natural order). The pickle tells runs apart by
    its key only, so runs that differ in any of these cannot go into one pickle, even under
    different keys: nothing would say which run had which strategy."""
    key = KEY_FORMATS[key_format]
    values = {s: sorted(set(frame[s].tolist())) for s in settings_of(frame) if s not in key}
    return {s: [canonical(v) for v in vs] for s, vs in values.items() if len(vs) > 1}


def differ_text(differ: dict[str, list[str]], key_format: int = 5) -> str:
    """'differ in strategy (fedavg, tensor_parallel), which the results pickle's key (...) cannot
    keep apart' of differing()'s answer."""
    return (
        "differ in "
        + "; ".join(f"{s} ({', '.join(vs)})" for s, vs in differ.items())
        + f", which the results pickle's key ({', '.join(KEY_FORMATS[key_format])}) cannot keep apart"
        + (
            "; the 6-tuple key (--key-format 6) holds enable_layerwise_swapping"
            if key_format == 5 and "enable_layerwise_swapping" in differ
            else ""
        )
    )


def refusal(frame: pd.DataFrame, key_format: int = 5) -> str | None:
    """Why the runs of `frame` cannot go into one pickle keyed by KEY_FORMATS[key_format] ('differ in
    ...', differing), or None when they can. A 5-tuple pickle is read as layerwise swapping off,
    so runs with it on need the 6-tuple key even where every run has it."""
    if differ := differing(frame, key_format):
        return differ_text(differ, key_format)
    if key_format == 5 and "enable_layerwise_swapping" in frame.columns and frame["enable_layerwise_swapping"].any():
        return (
            "have enable_layerwise_swapping=true, which the 5-tuple key cannot say (a 5-tuple pickle is read "
            "as layerwise swapping off); the 6-tuple key (--key-format 6) holds it"
        )
    return None


def pickle_dict(frame: pd.DataFrame, key_format: int = 5) -> Results:
    """The classic results dict of a frame, keyed by KEY_FORMATS[key_format]: exact Python types,
    rounds sorted, round 0 first. A frame without enable_layerwise_swapping (a 5-tuple pickle's)
    has it off.

    Runs that cannot go into one pickle (refusal) are a ResultsError naming the setting and its
    values, not a silent choice."""
    if (why := refusal(frame, key_format)) is not None:
        raise ResultsError(f"the runs {why}; export them as CSV instead")
    settings = KEY_FORMATS[key_format]
    if "enable_layerwise_swapping" not in frame.columns:
        frame = frame.assign(enable_layerwise_swapping=False)
    out: Results = {}
    ordered = frame.sort_values([*settings, "round"], kind="mergesort")
    for _, run in ordered.groupby(list(settings), sort=True):
        first = run.iloc[0]  # its settings, as the group's key has them
        key = tuple(kind(first[s]) for kind, s in zip(_KEY_TYPES[key_format], settings))
        if run["round"].duplicated().any():  # the same settings twice: only a hand-made frame has that
            raise ResultsError(
                f"{key!r} has several runs (their run ids differ): the results pickle holds one run per key"
            )
        out[key] = [
            (int(r), float(loss), float(acc))
            for r, loss, acc in zip(run["round"].tolist(), run["test_loss"].tolist(), run["test_accuracy"].tolist())
        ]
    return out


# --------------------------------------------------------------------------- the CSV


def _cell(column: str, value: Any) -> str:  # Any: whatever scalar a frame holds, numpy's or Python's
    """One CSV cell: empty for a missing value, True/False, floats as repr (1e-05), bytes as ints; a
    test loss or accuracy that is NaN (a diverged run) is a value, not a missing one: nan."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "nan" if column in ("test_loss", "test_accuracy") and value is not None else ""
    value = plain(value)  # a numpy bool_ too: True, False
    if isinstance(value, float):
        return str(int(value)) if column in BYTES_COLUMNS and value.is_integer() else repr(value)
    return str(value)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The CSV export's text: the columns CSV_COLUMNS in that order, rows in the frame's order;
    a column the frame lacks (a pickle's run has no strategy, no bytes) is written empty."""
    empty = [""] * len(frame)
    columns = [[_cell(c, v) for v in frame[c].tolist()] if c in frame.columns else empty for c in CSV_COLUMNS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(zip(*columns))
    return out.getvalue().encode()


def _csv_header(data: bytes) -> list[str] | None:
    """The first line's fields when the file starts with a line of text, else None (a binary
    pickle). A header longer than 4 KiB belongs to no results CSV."""
    try:
        first = data[:4096].split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError:
        return None
    return [name.strip() for name in next(csv.reader([first]), [])]


def _parse(kind: str, text: str) -> str | int | float | bool:
    if kind == "bytes":
        return float(text) if text.strip() else math.nan
    if kind == "str":
        return text
    if kind == "bool":
        word = text.strip().lower()
        if word in ("true", "1", "false", "0"):
            return word in ("true", "1")
        raise ValueError(text)
    return int(text) if kind == "int" else float(text)


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "True or False", "bytes": "a number or empty"}
_DTYPES: dict[str, Literal["int64", "float64", "bool"]] = {
    "int": "int64",
    "float": "float64",
    "bool": "bool",
    "bytes": "float64",
}


def _typed(path: Path, name: str, texts: pd.Series) -> pd.Series:
    """One CSV column in its type; a cell that is not is a ResultsError naming its line."""
    kind = _COLUMN_TYPES[name]
    parsed: dict[str, str | int | float | bool] = {}
    for text in texts.unique():
        try:
            parsed[text] = _parse(kind, text)
        except ValueError:
            line = int(texts.index[texts == text][0]) + 2  # the header is line 1
            raise ResultsError(f"{path}: line {line}: {name} is {text!r}, expected {_EXPECTED[kind]}") from None
    column = texts.map(parsed)
    return column.astype(_DTYPES[kind]) if kind in _DTYPES else column.astype(str)


def _frame_from_csv(path: Path, data: bytes, header: list[str]) -> pd.DataFrame:
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise ResultsError(
            f"{path}: not a results CSV: it has no column {', '.join(missing)} (a results CSV, "
            f"as `fedshard export --format csv` writes, has at least {', '.join(CSV_REQUIRED)})"
        )
    try:
        texts = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError is a ValueError
        raise ResultsError(f"{path}: not a readable results CSV: {e}") from None
    if texts.empty:
        raise ResultsError(f"{path}: the results CSV has no rows (no experiments)")
    # Other columns are not ours: ignored. A setting no row knows (a pickle's runs written as CSV)
    # is left out, as the pickle leaves it out; init_from is '' when there is none.
    known = [
        c
        for c in CSV_COLUMNS
        if c in texts.columns
        and not (c in SETTING_TYPES and c not in KEY_SETTINGS and c != "init_from" and (texts[c] == "").all())
    ]
    frame = pd.DataFrame({c: _typed(path, c, texts[c]) for c in known})
    settings = settings_of(frame)
    lr = frame["learning_rate"]
    for name, bad in (
        ("world_size", frame["world_size"] < 1),
        ("rounds", frame["rounds"] < 1),
        ("learning_rate", ~(np.isfinite(lr) & (lr > 0))),
        ("round", frame["round"] < 0),
    ):
        if bad.any():
            line = int(bad.argmax()) + 2  # the frame's index is its rows' positions
            raise ResultsError(f"{path}: line {line}: {name} {frame[name].iloc[line - 2].item()!r} is out of range")
    twice = frame.duplicated([*settings, "round"])
    if twice.any():
        line = int(twice.argmax()) + 2
        raise ResultsError(
            f"{path}: line {line}: round {frame['round'].iloc[line - 2].item()} of this run "
            "(the same settings and seed) appears twice"
        )
    return frame.sort_values([*settings, "round"], kind="mergesort").reset_index(drop=True)


def read(path: str | Path) -> pd.DataFrame:
    """The results frame of a results CSV or a results pickle, told apart by content: a first line
    naming any of CSV_REQUIRED is a CSV header; anything else must be a safe pickle."""
    path = Path(path)
    data = _read_bytes(path)
    header = _csv_header(data)
    if header is not None and set(header) & set(CSV_REQUIRED):
        return _frame_from_csv(path, data, header)
    try:
        return frame_from_pickle(_unpickle(path, data))
    except ResultsError as e:
        if header is None or len(header) < 2:
            raise
        raise ResultsError(
            f"{e}; nor is it a results CSV: its first line names none of the columns {', '.join(CSV_REQUIRED)}"
        ) from None
