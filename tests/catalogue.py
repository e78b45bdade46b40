"""docs/testing.md, generated from the tests: how to run them, where they are, the faults they
survive and the hostile inputs they try.

``python -m tests.catalogue > docs/testing.md`` rewrites the page; tests/test_catalogue.py fails
while the page differs from what this prints, while an entry names a test that does not exist,
and while a test named for a fault (killed, resumed, failing, a lock...) is in no entry.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

from tests.hostile.cases import CASES, catalogue_markdown

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


@dataclass(frozen=True)
class Proof:
    """What a set of tests shows: the fault or input (``what``), the outcome they assert, and
    the tests, as pytest node ids from the repository root."""

    what: str
    outcome: str
    tests: tuple[str, ...]


_SUBSET = "tests/test_subset.py"
_SCAN = "tests/text_filter/test_scan.py"
_STAGE = "tests/text_filter/test_stage.py"

FAULTS: list[Proof] = [
    Proof(
        "`primer demo` SIGKILLed at seeded random moments, then rerun",
        "same decisions and results table as an uninterrupted run, byte for byte; no `_SUCCESS` "
        "next to temporary files",
        (f"{_SUBSET}::test_killed_demo_resumes_to_the_same_outputs",),
    ),
    Proof(
        "each of filter, download, embed-pool, clip-filter, transductive, materialise, evaluate "
        "redone and SIGKILLed at a seeded moment after it starts writing, then its resumed run "
        "killed too",
        "the final rerun leaves that stage's output equal to the uninterrupted run's (same rows, "
        "no duplicate samples, byte-identical decisions, manifest and table)",
        (f"{_SUBSET}::test_each_stage_killed_part_way_resumes_to_the_same_output",),
    ),
    Proof(
        "embed stage interrupted part way",
        "the rerun embeds only the missing shards; same output",
        (
            f"{_SUBSET}::test_resume_after_interrupted_embed_stage",
            "tests/embed/test_embed.py::test_reruns_and_batch_sizes_agree_and_resume_skips_done",
        ),
    ),
    Proof(
        "download SIGKILLed mid-run, or shards missing",
        "the rerun fetches only the unfinished shards; no duplicate or lost sample",
        (
            "tests/download/test_download.py::test_killed_run_resumes",
            "tests/download/test_download.py::"
            "test_resume_finishes_missing_shards_without_duplicates",
        ),
    ),
    Proof(
        "text filter failing part way, or a failed run's scans left from other settings or "
        "without their fingerprint",
        "no `_SUCCESS`; the rerun reuses finished scans of the same inputs and settings only; "
        "same output",
        (
            f"{_SCAN}::test_a_run_failing_after_its_scan_resumes_from_the_finished_pieces",
            f"{_SCAN}::test_rerun_after_failure_with_other_settings_rescans",
            f"{_SCAN}::test_scan_parts_left_without_a_fingerprint_are_not_trusted",
            "tests/text_filter/test_families.py::"
            "test_a_changed_rule_rescans_and_the_same_rules_resume",
        ),
    ),
    Proof(
        "text filter failing after the scan of a file split into row-group pieces, one piece's "
        "marker lost",
        "the rerun scans that piece alone (the others untouched) and writes a clean run's bytes; "
        "the pieces give the same subset as the whole file, with and without URL "
        "de-duplication and under a class cap",
        (
            f"{_SCAN}::test_a_run_failing_after_its_scan_resumes_from_the_finished_pieces",
            "tests/text_filter/test_plan.py::"
            "test_a_large_file_scanned_in_row_group_pieces_gives_the_same_subset",
        ),
    ),
    Proof(
        "the driver out of memory in the text filter's global pass, rerun with a smaller "
        "`filter.global_memory_mb`",
        "every scan part reused (none rewritten), the global filters in URL buckets, a clean "
        "run's bytes",
        (
            f"{_SCAN}::test_a_driver_out_of_memory_reruns_in_buckets_on_the_same_scans",
            "tests/text_filter/test_global_filters.py::"
            "test_a_job_filtered_in_url_buckets_writes_what_one_pass_writes",
        ),
    ),
    Proof(
        "a scan task's publishing of a file failing (disk full), or a later file of the task "
        "unreadable while earlier ones are still being published",
        "the task fails with that error (a commit failing behind it is reported with it); the "
        "files published before it keep their markers, the failed one has none and no temporary "
        "files; the rerun equals a clean run",
        (
            f"{_SCAN}::test_a_failed_commit_fails_the_task_and_leaves_that_file_unmarked",
            f"{_SCAN}::test_a_failed_commit_stops_the_task_before_its_next_file",
            f"{_SCAN}::test_a_scan_error_still_waits_for_the_earlier_files_commits",
            f"{_SCAN}::test_a_commit_failing_behind_a_scan_error_is_reported_with_it",
        ),
    ),
    Proof(
        "caption filter stopped after some files",
        "the rerun reuses the finished files' parts, and redoes them when the settings change",
        (
            "tests/caption_filter/test_caption_filter.py::"
            "test_stage_resumes_finished_files_and_redoes_them_when_settings_change",
        ),
    ),
    Proof(
        "import-embeddings stopped before `_SUCCESS`",
        "the rerun reuses its shards for the same matches and clears them for other matches",
        ("tests/precomputed/test_import.py::test_import_needs_the_model_and_resumes",),
    ),
    Proof(
        "S3 endpoint failing after 1, 4 or 6 uploads",
        "the stage fails with the store's error, no `_SUCCESS`, every shard marked done is "
        "whole, readers refuse the partial output; the rerun equals a clean run",
        ("tests/embed/test_s3_outage.py::test_s3_failing_part_way_then_rerun_completes",),
    ),
    Proof(
        "one rank of a multi-process embedding failing",
        "every rank fails, with the failing rank's message",
        ("tests/embed/test_entry_points.py::test_a_failing_rank_fails_every_rank",),
    ),
    Proof(
        "a stage of `primer subset` failing",
        "the run stops; earlier outputs kept",
        (f"{_SUBSET}::test_failed_stage_stops_the_run_and_keeps_earlier_outputs",),
    ),
    Proof(
        "two runs on one run directory; a run that died holding the lock",
        "the second run refuses with a clear message; a live run keeps its lock on S3 however "
        "long it runs, a dead one's is taken over after its heartbeat goes stale, and a local "
        "lock is released by the kernel",
        (
            f"{_SUBSET}::test_second_run_on_same_directory_is_refused",
            "tests/core/test_run_lock.py::"
            "test_a_live_s3_run_keeps_its_lock_and_a_dead_ones_is_taken_over",
            "tests/core/test_run_lock.py::test_a_local_lock_is_released_by_the_kernel",
        ),
    ),
    Proof(
        "unreachable LAION metadata, data root or weights",
        "stops before any stage, naming the source and the fix",
        (f"{_SUBSET}::test_unreachable_sources_stop_before_any_stage",),
    ),
    Proof(
        "image server slow, resetting, 404/500, truncated, garbage, HTML, opt-out, bomb",
        "the download completes, each failure counted by reason in stats and manifest",
        ("tests/download/test_download.py::test_download_real_images_and_count_failures",),
    ),
    Proof(
        "atomic writes interrupted",
        "nothing left at the target name",
        (
            "tests/core/test_foundation.py::test_atomic_open_leaves_nothing_on_failure",
            "tests/core/test_foundation.py::test_staged_file_appears_only_on_commit",
        ),
    ),
    Proof(
        "determinism",
        "the demo from scratch twice: byte-identical decisions and the same table",
        (
            f"{_SUBSET}::test_second_run_from_scratch_is_byte_identical",
            "tests/select/test_filters.py::test_decisions_are_byte_identical_across_runs_and_chain",
        ),
    ),
]

HOSTILE: list[Proof] = [
    Proof(
        "parquet missing a column, or not parquet at all",
        "an error naming the file and the column (a column mapping fixes it), or with "
        "`skip_bad_files` the file listed in `_stats.json` and the rest resumed",
        (
            f"{_STAGE}::test_missing_column_fails_naming_file_and_column",
            f"{_STAGE}::test_corrupt_file_fails_or_is_skipped_and_rerun_resumes",
        ),
    ),
    Proof(
        "one garbled row group in a file scanned in pieces",
        "an error naming the file and the piece's row groups, or the whole file listed and none "
        "of its pieces' rows kept",
        (
            "tests/text_filter/test_plan.py::"
            "test_a_bad_row_group_fails_its_file_or_leaves_the_whole_file_out",
        ),
    ),
    Proof(
        "captions 5 MB long, invalid UTF-8, right-to-left overrides, zero-width and control "
        "characters, through a Spark run",
        "no crash; counted as `caption_too_long`, or matched as a reader would",
        (f"{_STAGE}::test_hostile_captions_never_crash",),
    ),
    Proof(
        "fuzzed captions mixing entities, compatibility forms, combining marks, NUL and emoji, "
        "and every code point below U+3000",
        "every matching engine gives the same label, term and ambiguous classes",
        (
            "tests/text_filter/test_matcher.py::test_every_engine_agrees_on_fuzzed_captions",
            "tests/text_filter/test_matcher.py::"
            "test_non_ascii_characters_in_the_kernel_match_the_unicode_path",
            "tests/text_filter/test_matcher.py::test_invalid_utf8_never_crashes",
        ),
    ),
    Proof(
        "dataset YAMLs: empty list, duplicate or empty class names, bad templates, synonyms of "
        "unknown classes, missing descriptions file, invalid YAML",
        "`ConfigError` naming the file",
        ("tests/core/test_datasets.py::test_bad_dataset_yamls_are_clear_errors",),
    ),
    Proof(
        "URLs with credentials, non-http schemes, private, loopback, link-local and metadata "
        "addresses in every spelling, `localhost`, IDN and fullwidth spellings of internal hosts",
        "refused with a reason, judged without any network; with the opt-in off the server sees "
        "no request; a private peer is refused at connect time",
        (
            "tests/download/test_urlcheck.py::test_private_and_special_addresses_refused",
            "tests/download/test_urlcheck.py::test_schemes_credentials_and_garbage",
            "tests/download/test_download.py::test_refusal_without_opt_in_fetches_nothing",
            "tests/download/test_download.py::test_connect_time_check_refuses_private_peers",
        ),
    ),
    Proof(
        "webdataset tars: a sample without an image, bytes that are not an image, path-traversal "
        "names",
        "counted with the uid; nothing written outside the output",
        (
            "tests/embed/test_embed.py::test_pool_embeddings_unit_aligned_and_bad_images_counted",
            "tests/test_materialise.py::test_safe_name_never_escapes",
        ),
    ),
    Proof(
        "a checkpoint whose pickle runs code when loaded",
        "refused; the code never runs",
        ("tests/embed/test_embed.py::test_checkpoint_round_trip_and_code_pickle_refused",),
    ),
    Proof(
        "a class with no priming images; an empty pool",
        "reported in the stats as empty classes, not a crash",
        ("tests/select/test_filters.py::test_empty_class_reported_not_crash",),
    ),
    Proof(
        "the test set's images in the priming pool or the shots",
        "evaluation refuses train/test leakage; planted copies are dropped and counted",
        (
            "tests/evaluate/test_evaluate.py::test_cli_refuses_train_test_leakage",
            "tests/evaluate/test_evaluate.py::"
            "test_planted_copies_of_test_images_and_shots_are_dropped_and_counted",
        ),
    ),
]

# A test whose name holds one of these words is about a fault: it must be in an entry above.
FAULT_WORDS = frozenset(
    "kill killed resume resumes resumed interrupted outage died failing failed lock crash".split()
)

INTRO = """\
# Testing Primer

<!-- Generated by `python -m tests.catalogue > docs/testing.md`; edit tests/catalogue.py (or
the hostile-input catalogue, tests/hostile/cases.py), not this page. -->

Every line of the tables below is a test that fails if the behaviour breaks.

## Running the tests

```bash
make test                                                        # the whole suite, as CI runs it
make test PYTEST_ARGS='-k kill'                                  # with pytest's options
.venv/bin/python -m pytest tests/text_filter/test_plan.py -q     # one file
.venv/bin/python -m pytest tests/embed -q -k "resume or s3"      # a folder, tests by name
.venv/bin/python -m pytest "tests/hostile/test_hostile.py::test_hostile_input[caption_null]"
```

`make test` runs `pytest -n 2 -q` (about 10 minutes on 2 cores) with `HF_HUB_OFFLINE=1`, which
`tests/conftest.py` sets for a direct pytest call too. `make lint` runs ruff.

What the suite needs (`make install` sets it all up, `scripts/install_system_deps.sh` the
Debian packages):

- Python 3.11 with every extra of the package (`.[all,dev]`; torch's CPU wheel). No GPU.
- Java 17 for Spark: the text filter, caption filter, import and whole-pipeline tests start a
  `local[2]` session (one per test worker).
- The `dataset-fashion-mnist` Debian package (real images for the loopback image server), and
  Chromium for the report's browser test (skipped without it).
- No network beyond loopback: images come from a loopback HTTP server, `s3://` from moto's S3
  server on 127.0.0.1, Spark binds 127.0.0.1, and models are built from the tiny config in
  `conf/models` (`pretrained=None`) with the Hugging Face hub offline.

## Where the tests are

`tests/` mirrors the package: the tests of `pipeline/<part>/` are in `tests/<part>/`. Shared
fixtures (loopback image server, moto S3, Spark session, LAION-like parquet, tiny open_clip
model, a finished demo run) are in `tests/conftest.py`; `tests/hostile/` holds the hostile-input
catalogue; the files at the top run the whole pipeline, check the fixtures, and test
`pipeline/materialise.py`.
"""


NOT_COVERED = """\
What these do not cover: the per-stage kill test covers the stages listed (not the task and
text embeddings, which share the pool embedder's code, nor the report, which is one atomic
write), and a kill can land after a fast stage has finished; an S3 outage is injected at the
upload call in-process, which covers the embed, selection, materialise and evaluate writers but
not img2dataset's or Spark's worker processes; the address rules have the limits stated in the
README's security notes.
"""


def _first_paragraph(path: str) -> str:
    """A module docstring's first paragraph on one line, Sphinx roles (``:mod:``) dropped."""
    doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
    return re.sub(r":[a-z]+:`", "`", " ".join(doc.split("\n\n")[0].split()))


def list_test_files() -> list[str]:
    """Every test module, as a path from the repository root, folders after the top level."""
    found = []
    for d, dirs, files in os.walk(TESTS):
        dirs[:] = sorted(x for x in dirs if not x.startswith((".", "_")) and x != "data")
        found += [os.path.join(d, f) for f in files if re.fullmatch(r"test_\w+\.py", f)]
    rel = [os.path.relpath(p, REPO).replace(os.sep, "/") for p in found]
    return sorted(rel, key=lambda p: (p.count("/") > 1, p))


def layout_markdown() -> str:
    lines = ["| file | what it tests |", "|---|---|"]
    for rel in list_test_files():
        text = _first_paragraph(os.path.join(REPO, rel)).replace("|", "\\|")
        lines.append(f"| `{rel}` | {text} |")
    return "\n".join(lines)


def _proofs_markdown(head: str, proofs: list[Proof]) -> str:
    lines = [f"| {head} | outcome | tests |", "|---|---|---|"]
    for p in proofs:
        tests = "<br>".join(f"`{t}`" for t in p.tests)
        lines.append(f"| {p.what} | {p.outcome} | {tests} |".replace("\n", " "))
    return "\n".join(lines)


def render() -> str:
    """The whole of docs/testing.md."""
    return "\n".join(
        [
            INTRO,
            layout_markdown(),
            "",
            "## Faults survived",
            "",
            _proofs_markdown("fault", FAULTS),
            "",
            NOT_COVERED,
            "## Hostile inputs tried",
            "",
            f"The catalogue, `tests/hostile/cases.py`: {len(CASES)} inputs, each run through the "
            "real code of its stage and held to one expected outcome (an error naming the file, "
            "a count under a named reason, or correct processing).",
            "",
            catalogue_markdown(),
            "",
            "Hostile inputs tried elsewhere:",
            "",
            _proofs_markdown("input", HOSTILE),
            "",
        ]
    )


if __name__ == "__main__":
    print(render(), end="")
