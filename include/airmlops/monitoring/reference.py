"""The champion's reference data, summarized once at deploy.

Drift is measured against the data the champion was trained and tested on. Reading that whole
data set every window would make each monitoring run as expensive as the training set is large,
so at deploy time :func:`summarize_reference` keeps:

- a fixed, time-stratified sample of ``reference_sample_size`` rows of the model inputs (and the
  champion's predictions on them, when the frame has a ``prediction`` column, for prediction
  drift), saved as Parquet; every window is compared with this same sample;
- per-column statistics of the *whole* reference as JSON: null share, min/max and deciles of
  numeric columns, category frequencies of categorical ones. The data quality checks use them
  (the reference range when the spec declares no bounds, the known categories).

Both files are written atomically (temporary name, then rename), the JSON last: it records the
Parquet file's SHA-256, so :func:`load_reference` never pairs statistics with another sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.sampling import stratified_sample
from airmlops.paths import atomic_replace, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.spec import PipelineSpec

PREDICTION_COLUMN = "prediction"
SAMPLE_FILE = "reference_sample.parquet"
PROFILE_FILE = "reference_profile.json"
FORMAT_VERSION = 1
DECILES = tuple(round(0.1 * i, 1) for i in range(1, 10))
MAX_CATEGORIES = 10_000
"""Categories kept per column (the most frequent); more would only bloat the JSON."""


class ReferenceError(ValueError):
    """A reference profile is missing, incomplete or does not match its sample."""


@dataclass(frozen=True)
class ColumnProfile:
    """Statistics of one column over the whole reference data."""

    name: str
    type: str  # "numeric" or "categorical"
    rows: int
    null_share: float
    min: float | None = None
    max: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)
    """Deciles (``"0.1"`` .. ``"0.9"``) of a numeric column."""
    categories: dict[str, float] = field(default_factory=dict)
    """Frequency of each category among non-null values of a categorical column."""


@dataclass(frozen=True)
class ReferenceProfile:
    """The summarized reference: a fixed sample plus whole-data statistics per column."""

    pipeline: str
    task: str
    input_types: dict[str, str]
    rows: int
    sample: pd.DataFrame = dataclasses.field(repr=False, compare=False)
    sample_digest: str
    columns: dict[str, ColumnProfile]
    prediction: ColumnProfile | None
    spec_hash: str
    features_hash: str
    seed: int
    format_version: int = FORMAT_VERSION

    @property
    def has_prediction(self) -> bool:
        return self.prediction is not None

    def to_json_dict(self) -> dict[str, Any]:
        """Everything but the sample, as JSON-ready values."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "sample"}
        data["columns"] = {n: dataclasses.asdict(c) for n, c in self.columns.items()}
        data["prediction"] = dataclasses.asdict(self.prediction) if self.prediction else None
        return data


def prepare_inputs(frame: pd.DataFrame, input_types: dict[str, str],
                   extra_numeric: tuple[str, ...] = (), *,
                   boolean: Collection[str] = ()) -> pd.DataFrame:
    """The model inputs of ``frame`` with uniform dtypes: float64 numerics, str-or-None categories.

    A column absent from ``frame`` becomes all-null (a schema break shows up as missing values);
    a numeric cell that is not a number becomes NaN. Categories are in their canonical text
    (:mod:`airmlops.data.categories`), so raw training rows (``True``, ``1.0``) and the
    prediction log ("true", "1") count alike; ``boolean`` names the boolean features
    (``spec.boolean_features``), whose 1/0 are "true"/"false". ``extra_numeric`` columns (the
    prediction) are kept, coerced to float, when present.
    """
    import pandas as pd

    flags = set(boolean)
    columns = {name: prepare_column(frame, name, kind, boolean=name in flags)
               for name, kind in input_types.items()}
    for name in extra_numeric:
        if name in frame.columns:
            columns[name] = prepare_column(frame, name, "numeric")
    return pd.DataFrame(columns, index=pd.RangeIndex(len(frame)))


def prepare_column(frame: pd.DataFrame, name: str, kind: str, *,
                   boolean: bool = False) -> Any:
    """One column of :func:`prepare_inputs` as a NumPy array (float64, or objects for
    categories: canonical text, None where missing)."""
    import numpy as np
    import pandas as pd

    from airmlops.data.categories import category_series

    if name not in frame.columns:
        return np.full(len(frame), np.nan) if kind == "numeric" else np.full(len(frame), None)
    if kind == "numeric":
        numbers = pd.to_numeric(frame[name], errors="coerce")
        return numbers.to_numpy(dtype="float64", na_value=np.nan)
    values = category_series(frame[name], boolean=boolean)
    text = values.to_numpy(dtype=object)
    text[values.isna().to_numpy()] = None
    return text


def profile_column(name: str, kind: str, values: pd.Series) -> ColumnProfile:
    """Whole-data statistics of one prepared column."""
    import numpy as np

    rows = len(values)
    present = values.dropna()
    null_share = float(1.0 - len(present) / rows) if rows else 0.0
    if kind == "numeric":
        if present.empty:
            return ColumnProfile(name=name, type=kind, rows=rows, null_share=null_share)
        array = present.to_numpy(dtype="float64")
        quantiles = np.quantile(array, DECILES)
        return ColumnProfile(
            name=name, type=kind, rows=rows, null_share=null_share,
            min=float(array.min()), max=float(array.max()),
            quantiles={str(q): float(v) for q, v in zip(DECILES, quantiles, strict=True)},
        )
    frequencies = present.astype(str).value_counts(normalize=True).head(MAX_CATEGORIES)
    categories = {str(k): float(v) for k, v in sorted(frequencies.items())}
    return ColumnProfile(name=name, type=kind, rows=rows, null_share=null_share,
                         categories=categories)


def summarize_reference(frame: pd.DataFrame, spec: PipelineSpec, config: MonitoringConfig,
                        directory: Path | str | None = None) -> ReferenceProfile:
    """Summarize the champion's reference ``frame`` (its training/test rows) once, at deploy.

    ``frame`` holds the model inputs, ideally the spec's timestamp (the sample is stratified over
    time when it is there) and optionally the champion's predictions as ``prediction``. With a
    ``directory`` the profile is also written there (see :func:`save_reference`).
    """
    if len(frame) == 0:
        raise ReferenceError("the reference frame is empty")
    types = spec.input_types
    missing = [name for name in types if name not in frame.columns]
    if missing:
        raise ReferenceError(f"the reference frame lacks model inputs {missing}")
    extra = (PREDICTION_COLUMN,) if PREDICTION_COLUMN in frame.columns else ()
    prepared = prepare_inputs(frame, types, extra, boolean=spec.boolean_features)
    if spec.timestamp in frame.columns:
        prepared[spec.timestamp] = frame[spec.timestamp].to_numpy()
        sample = stratified_sample(prepared, spec.timestamp, config.reference_sample_size,
                                   config.seed, strata=config.strata)
        sample = sample.drop(columns=spec.timestamp)
        prepared = prepared.drop(columns=spec.timestamp)
    else:
        sample = _plain_sample(prepared, config.reference_sample_size, config.seed)
    columns = {name: profile_column(name, kind, prepared[name]) for name, kind in types.items()}
    prediction = (profile_column(PREDICTION_COLUMN, "numeric", prepared[PREDICTION_COLUMN])
                  if extra else None)
    profile = ReferenceProfile(
        pipeline=spec.name, task=spec.task, input_types=dict(types), rows=len(frame),
        sample=sample.reset_index(drop=True), sample_digest="", columns=columns,
        prediction=prediction, spec_hash=spec.spec_hash(), features_hash=spec.features_hash(),
        seed=config.seed,
    )
    if directory is not None:
        profile = save_reference(profile, directory)
    return profile


def _plain_sample(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    import numpy as np

    if len(frame) <= size:
        return frame.reset_index(drop=True)
    rng = np.random.default_rng([seed, 0x5245_4600])
    rows = np.sort(rng.choice(len(frame), size=size, replace=False))
    return frame.iloc[rows].reset_index(drop=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_reference(profile: ReferenceProfile, directory: Path | str) -> ReferenceProfile:
    """Write the sample (Parquet) then the statistics (JSON) atomically; return the profile
    with its ``sample_digest`` set. Writing the same profile again leaves the same files."""
    directory = Path(directory)
    sample_path = directory / SAMPLE_FILE
    atomic_replace(sample_path, lambda temp: profile.sample.to_parquet(temp, index=False))
    profile = dataclasses.replace(profile, sample_digest=_sha256(sample_path))
    text = json.dumps(profile.to_json_dict(), indent=2, sort_keys=True)
    atomic_write_text(directory / PROFILE_FILE, text)
    return profile


def load_reference(directory: Path | str) -> ReferenceProfile:
    """Read a profile written by :func:`save_reference`; raise :class:`ReferenceError` if it is
    missing, of another format version, or its sample is not the one it was written with."""
    import pandas as pd

    directory = Path(directory)
    profile_path, sample_path = directory / PROFILE_FILE, directory / SAMPLE_FILE
    if not profile_path.is_file() or not sample_path.is_file():
        raise ReferenceError(f"no reference profile in {directory} (expected {PROFILE_FILE} "
                             f"and {SAMPLE_FILE}; it is written at deploy)")
    data = json.loads(profile_path.read_text(encoding="utf-8"))
    if data.get("format_version") != FORMAT_VERSION:
        raise ReferenceError(f"{profile_path}: format version {data.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION}")
    if _sha256(sample_path) != data["sample_digest"]:
        raise ReferenceError(f"{sample_path} does not match the digest recorded in "
                             f"{profile_path}; summarize the reference again")
    sample = pd.read_parquet(sample_path)
    for name, kind in data["input_types"].items():
        if kind == "categorical":
            sample[name] = sample[name].astype(object).where(sample[name].notna(), None)
    data["columns"] = {n: ColumnProfile(**c) for n, c in data["columns"].items()}
    data["prediction"] = ColumnProfile(**data["prediction"]) if data["prediction"] else None
    return ReferenceProfile(sample=sample, **data)
