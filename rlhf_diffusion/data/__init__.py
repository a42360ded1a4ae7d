"""Offline training data: preference pairs streamed from Pick-a-Pic v2 Parquet or JSONL (`data/preference.py`)."""

from rlhf_diffusion.data.preference import (
    CORRUPT_REASONS,
    PICKAPIC_V2_SCHEMA,
    DataStats,
    PickapicRow,
    PreferenceDataError,
    PreferenceDataSpec,
    PreferenceJsonlRow,
    PreferencePair,
    PreferenceSource,
    open_preference_source,
    pairs_to_tensors,
    resolve_parquet_files,
    write_pickapic_parquet,
    write_preference_jsonl,
)

__all__ = [
    "CORRUPT_REASONS",
    "PICKAPIC_V2_SCHEMA",
    "DataStats",
    "PickapicRow",
    "PreferenceDataError",
    "PreferenceDataSpec",
    "PreferenceJsonlRow",
    "PreferencePair",
    "PreferenceSource",
    "open_preference_source",
    "pairs_to_tensors",
    "resolve_parquet_files",
    "write_pickapic_parquet",
    "write_preference_jsonl",
]
