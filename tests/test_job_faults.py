"""The batch job under faults (#25 items 7, 8 and 10): damaged resume state is set aside and its
chunks ranked again, said once; a write the disk refuses (a real one: a file size limit, which fails
writes with EFBIG as a full disk fails them with ENOSPC) is one message saying how to resume; and the
Ray engine's --address and input folder are refused before anything is written. No Ray cluster is
started here (tests/test_ray.py runs the Ray engine's jobs)."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from recengine.running import batch
from recengine.running.batch import rank_file, work_folder
from recengine.core.data import write_parquet_atomic
from recengine.errors import ConfigError, DataError, RecengineError
from recengine.parts.context import FeatureContext

from synthetic import catalogue, feature_set, interactions, ranking_job

CHUNK_ROWS = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ranker = feature_set(num_boost_round=20, num_threads=1)
    return ranking_job(tmp_path_factory.mktemp("faults"), interactions(n_users=120, per_user=20), ranker, per_user=12)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted job's output, which every resumed job must equal byte for byte."""
    report = run(setup, tmp_path_factory.mktemp("reference") / "ranked.parquet")
    assert report.chunks >= 4
    return report


def run(setup, output):
    folder, model, events = setup
    return rank_file(model, folder / "candidates.parquet", output, FeatureContext.from_frames(events, catalogue()),
                     k=5, chunk_rows=CHUNK_ROWS, progress=False)


def stopped_before_the_merge(setup, output, monkeypatch):
    """Run the job up to its merge, which fails: every chunk finished, its parts and manifest kept."""
    def stop(*_):
        raise RuntimeError("stopped before the merge")

    with monkeypatch.context() as patched:
        patched.setattr(batch, "merge_parts", stop)
        with pytest.raises(RuntimeError, match="stopped before the merge"):
            run(setup, output)
    return work_folder(output)


def notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("recengine:")]


# -- item 8: damaged resume state ------------------------------------------------------------------------


def test_a_truncated_part_is_set_aside_its_chunk_ranked_again_and_that_said_once(setup, reference, tmp_path, monkeypatch, capsys):
    # Was: every rerun failed in the merge (polars could not read the part) until the folder was deleted.
    output = tmp_path / "ranked.parquet"
    work = stopped_before_the_merge(setup, output, monkeypatch)
    part = work / "part-00002.parquet"
    written = part.read_bytes()
    part.write_bytes(written[: len(written) // 2])
    capsys.readouterr()
    work = stopped_before_the_merge(setup, output, monkeypatch)  # the rerun, stopped again to look at its folder
    said = notes(capsys)
    assert len(said) == 1 and str(part) in said[0] and "ranking chunk 2 again" in said[0], said
    assert (work / "damaged" / "part-00002.parquet").read_bytes() == written[: len(written) // 2]
    assert part.read_bytes() == written
    report = run(setup, output)
    assert notes(capsys) == []  # said once: the part is whole again
    assert report.skipped == report.chunks
    assert output.read_bytes() == reference.output.read_bytes()
    assert not work.exists()


def test_a_part_replaced_by_another_chunks_is_caught_by_its_digest(setup, reference, tmp_path, monkeypatch, capsys):
    # A readable part with the wrong rows: was merged silently, giving one chunk's users twice and
    # another's never.
    output = tmp_path / "ranked.parquet"
    work = stopped_before_the_merge(setup, output, monkeypatch)
    shutil.copyfile(work / "part-00001.parquet", work / "part-00003.parquet")
    capsys.readouterr()
    report = run(setup, output)
    said = notes(capsys)
    assert len(said) == 1 and "part-00003.parquet is damaged (its sha256 is" in said[0], said
    assert report.skipped == report.chunks - 1
    assert output.read_bytes() == reference.output.read_bytes()


def test_a_manifest_from_before_part_digests_still_has_its_parts_footers_checked(setup, reference, tmp_path, monkeypatch, capsys):
    output = tmp_path / "ranked.parquet"
    work = stopped_before_the_merge(setup, output, monkeypatch)
    state = json.loads((work / "manifest.json").read_text())
    del state["parts"]
    (work / "manifest.json").write_text(json.dumps(state))
    part = work / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-40])  # no footer
    capsys.readouterr()
    report = run(setup, output)
    said = notes(capsys)
    assert len(said) == 1 and "part-00000.parquet is damaged (not a readable parquet file" in said[0], said
    assert report.skipped == report.chunks - 1
    assert output.read_bytes() == reference.output.read_bytes()


MANIFEST_DAMAGE = {
    "torn": lambda text: text[: len(text) // 2].encode(),
    "empty": lambda text: b"",
    "not-utf8": lambda text: b"\xff\xfe" + text.encode(),
    "null": lambda text: b"null",
    "rows-a-list": lambda text: json.dumps({**json.loads(text), "rows": [1, 2]}).encode(),
    "a-negative-row-count": lambda text: json.dumps({**json.loads(text), "rows": {"0": -5}}).encode(),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_damaged_manifest_is_set_aside_and_every_chunk_ranked_again(setup, reference, tmp_path, monkeypatch, capsys, damage):
    # Was: a JSONDecodeError, AttributeError or TypeError on every rerun until the folder was deleted.
    output = tmp_path / "ranked.parquet"
    work = stopped_before_the_merge(setup, output, monkeypatch)
    manifest = work / "manifest.json"
    damaged = MANIFEST_DAMAGE[damage](manifest.read_text())
    manifest.write_bytes(damaged)
    capsys.readouterr()
    work = stopped_before_the_merge(setup, output, monkeypatch)
    said = notes(capsys)
    assert len(said) == 1 and f"{manifest} is damaged" in said[0] and "every chunk is ranked again" in said[0], said
    assert (work / "damaged" / "manifest.json").read_bytes() == damaged
    report = run(setup, output)
    assert notes(capsys) == []
    assert report.skipped == report.chunks  # the rerun that stopped at the merge ranked every chunk again
    assert output.read_bytes() == reference.output.read_bytes()


# -- item 7: a write the disk refuses --------------------------------------------------------------------


def test_write_parquet_atomic_turns_a_refused_write_into_a_message_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(target)
    before = target.read_bytes()
    frame = pl.DataFrame({"a": np.random.default_rng(0).random(50_000)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, hard))  # this process's writes past 16 KiB fail (EFBIG)
    try:
        with pytest.raises(RecengineError) as refused:
            write_parquet_atomic(frame, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(refused.value) == (f"cannot write {target}: no room left (File too large: the disk is full, or a quota or "
                                  "a file size limit was reached). Free space there, then run the command again.")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def cli(folder, args, limit=None, env=None, timeout=300):
    """The real CLI in a subprocess in `folder`; `limit`: its writes past that many bytes fail (EFBIG)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (Python ignores it too) a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    environ = {**os.environ, "RECENGINE_CACHE_DIR": str(folder / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-c", "from recengine.interfaces.cli import cli; cli()", *args], cwd=folder,
                          capture_output=True, text=True, env=environ, timeout=timeout, check=False,
                          preexec_fn=limited if limit else None)


def rank_args(setup, output, *more):
    folder = setup[0]
    return ["rank", "--model", str(folder / "model"), "--events", str(folder / "events.parquet"), "--items",
            str(folder / "items.parquet"), "--input", str(folder / "candidates.parquet"), "--output", str(output),
            "--k", "5", "--chunk-rows", str(CHUNK_ROWS), *more]


def one_paragraph(done) -> str:
    """The CLI's error: exit 2, no traceback, and one paragraph (after the progress bar, if the job had started)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "\nError: " in f"\n{done.stderr}", done.stderr
    message = done.stderr[done.stderr.rfind("Error: "):].strip()
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("fails_at", ["part", "merge"])
def test_rank_on_a_full_disk_says_so_and_a_rerun_resumes_to_identical_bytes(setup, reference, tmp_path, monkeypatch, fails_at):
    # Was: a raw polars ComputeError ("File out of specification: underlying IO error") and a traceback.
    sizes = [p.stat().st_size for p in stopped_before_the_merge(setup, tmp_path / "probe.parquet", monkeypatch).glob("part-*")]
    merged = reference.output.stat().st_size
    assert max(sizes) < merged // 2
    # Parts fit and the merged output does not; or no part does (the manifest, under 1 KiB at first, does).
    limit = merged // 2 if fails_at == "merge" else min(sizes) - 1
    assert limit > 1_024
    output = tmp_path / "ranked.parquet"
    message = one_paragraph(cli(tmp_path, rank_args(setup, output), limit=limit))
    failed = output if fails_at == "merge" else work_folder(output) / "part-"
    assert f"cannot write {failed}" in message and "no room left (File too large" in message, message
    assert "Free space there, then run the same command again" in message
    assert ("every chunk is finished" if fails_at == "merge" else "it resumes from the chunks already finished") in message
    assert not output.exists()
    finished = json.loads((work_folder(output) / "manifest.json").read_text())["rows"]
    assert len(finished) == (reference.chunks if fails_at == "merge" else 0)
    done = cli(tmp_path, rank_args(setup, output))
    assert done.returncode == 0, done.stderr
    assert (f"{len(finished)} finished earlier and skipped" in done.stdout) == bool(finished)
    assert output.read_bytes() == reference.output.read_bytes()


# -- item 10: the Ray engine's address and input folder --------------------------------------------------


def test_an_address_where_nothing_answers_is_refused_within_the_timeout(setup, tmp_path):
    # A port that accepts connections and never speaks: Ray waited for it for ever (over 200 s measured).
    pytest.importorskip("ray")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        done = cli(tmp_path, rank_args(setup, tmp_path / "out.parquet", "--engine", "ray", "--address", address),
                   env={"RECENGINE_RAY_CONNECT_TIMEOUT": "1"}, timeout=120)
    message = one_paragraph(done)
    assert f"no Ray cluster answered at --address {address} within 1 s" in message, message
    assert "RECENGINE_RAY_CONNECT_TIMEOUT" in message and time.monotonic() - started < 60
    assert not list(tmp_path.glob("*out.parquet*"))  # no output, no parts folder


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf"])
def test_a_connect_timeout_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    from recengine.running.distributed import connect_timeout

    monkeypatch.setenv("RECENGINE_RAY_CONNECT_TIMEOUT", value)
    with pytest.raises(ConfigError, match=f"RECENGINE_RAY_CONNECT_TIMEOUT='{value}'.*a number above 0"):
        connect_timeout()


def test_a_server_that_is_not_a_ray_head_is_refused_at_once():
    from recengine.running.distributed import _check_answers

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        address = f"127.0.0.1:{server.getsockname()[1]}"

        def answer_http():
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer_http)
        thread.start()
        with pytest.raises(ConfigError, match=f"something answers at --address {address}, but not as a Ray head"):
            _check_answers(address, 30)
        thread.join()


def _mixed(folder, second: pl.DataFrame, first: pl.DataFrame | None = None):
    folder.mkdir()
    (first if first is not None else pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4]})).write_parquet(folder / "a.parquet")
    (folder / "day=2").mkdir()
    second.write_parquet(folder / "day=2" / "b.parquet")
    return folder


def test_a_folder_mixing_schemas_is_refused_naming_the_files(setup, tmp_path):
    # Was: the driver's checks passed (each file is fine alone), then Ray failed mid-job ("Unable to
    # merge: Field user_id has incompatible types") with a traceback, leaving a parts folder.
    from recengine.running.distributed import _checked_input, _checked_uri

    events = setup[2]
    context = FeatureContext.from_frames(events, catalogue())
    strings = _mixed(tmp_path / "strings", pl.DataFrame({"user_id": ["5", "6"], "item_id": [7, 8]}))
    for check, source in ((_checked_input, strings), (_checked_uri, strings.as_uri())):
        with pytest.raises(DataError) as refused:
            check(source, False, {}, context)
        assert str(refused.value).startswith(f"{source}: its parquet files differ in their columns or types")
        assert "column 'user_id' is int64 in a.parquet, but large_string in day=2/b.parquet" in str(refused.value)
    at = pl.lit(events["timestamp"].max() + timedelta(hours=1))
    timed = _mixed(tmp_path / "timed", pl.DataFrame({"user_id": [5], "item_id": [7]}).with_columns(at.alias("timestamp")))
    with pytest.raises(DataError, match=r"day=2/b.parquet has the columns \['item_id', 'timestamp', 'user_id'\] but "
                                        r"a.parquet has \['item_id', 'user_id'\]"):
        _checked_input(timed, False, {}, context)


def test_a_folder_whose_schemas_ray_unifies_is_accepted(setup, tmp_path):
    # Other column order and integer widths: Ray reads these as one table, so they are not refused.
    from recengine.running.distributed import _checked_input

    events = setup[2]
    second = pl.DataFrame({"item_id": [7, 8], "user_id": [5, 6]}, schema={"item_id": pl.Int32, "user_id": pl.Int64})
    ok = _mixed(tmp_path / "ok", second)
    total, _, _, keys, _ = _checked_input(ok, False, {}, FeatureContext.from_frames(events, catalogue()))
    assert total == 4 and keys == ["user_id", "timestamp"]
