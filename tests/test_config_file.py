"""Settings files (matcher/cli/config.py): ``--config FILE`` for serve and the overnight
job, ``matcher config check``; and the job's options taken from ReindexConfig and serve's
model-pack options (issue 28)."""
from __future__ import annotations

import csv
import re
import time
from importlib import resources
from pathlib import Path

import pytest

from matcher.cli import build_parser, command_parser, main
from matcher.cli.config import apply_file
from matcher.cli.reindex import _reindex_config
from matcher.cli.serve import _server_config
from matcher.face.models import ModelPack, default_pack
from matcher.gallery.scoremodel import SHIPPED_PACKAGE, shipped_file
from matcher.gallery.snapshot import verify_snapshot
from matcher.reindex.job import ReindexConfig


def _parse(command: str, argv: list[str], settings: Path | None = None):
    parser = build_parser(command)
    if settings is not None:
        apply_file(command_parser(parser, command), command, settings)
    return parser.parse_args([command, *argv])


@pytest.mark.parametrize("text, line, expected", [
    ('listen = "127.0.0.1:6000"\nmax_batch = 4\n', 2, "unknown key max_batch (did you mean "
                                                      "max-batch?)"),
    ('\n\nworkers = "2"\n', 3, "workers: expected an integer >= 1, got a string '2'"),
    ('grace = 5\nmax-batch = 0\n', 2, "max-batch: expected an integer >= 1, got 0"),
    ('fmr = 1.5\n', 1, "fmr: expected a number in (0, 1), got 1.5"),
    ('flip-augment = "yes"\n', 1, "flip-augment: expected true or false, got a string"),
    ('audit-failure = "sometimes"\n', 1, "audit-failure: expected one of fail_closed, "
                                         "fail_open; got 'sometimes'"),
    ('max-wait-ms = 2.5\n[reindex]\nactors = 0\n', 3, "reindex.actors: expected an integer "
                                                      ">= 1, got 0"),
    ('[reindex]\ndata = "/srv/other"\n', 2, "reindex.data: shared with matcher serve: set it "
                                            "once, at the top level"),
    ('[gateway]\nport = 1\n', 1, "unknown table [gateway]"),
])
def test_a_bad_key_stops_the_start_naming_file_line_and_key(tmp_path, capsys, text, line,
                                                            expected):
    settings = tmp_path / "writer.toml"
    settings.write_text(text)
    assert main(["serve", "--config", str(settings)]) == 2  # before anything loads
    err = capsys.readouterr().err
    assert f"{settings}:{line}: {expected}" in err, err


def test_every_problem_is_named_at_once_in_file_order(tmp_path, capsys):
    settings = tmp_path / "replica.toml"
    settings.write_text('threads = 0\nlisten = 5\n\nbogus = true\n')
    assert main(["config", "check", str(settings)]) == 2
    err = capsys.readouterr().err
    assert re.findall(rf"{re.escape(str(settings))}:(\d+): (\S+)", err) == [
        ("1", "threads:"), ("2", "listen:"), ("4", "unknown")], err


def test_invalid_toml_is_refused_with_its_position(tmp_path, capsys):
    settings = tmp_path / "writer.toml"
    settings.write_text('listen = "127.0.0.1:6000"\ngrace = \n')
    assert main(["serve", "--config", str(settings)]) == 2
    assert "not valid TOML" in (err := capsys.readouterr().err) and "line 2" in err


def test_a_flag_overrides_the_file_and_the_file_overrides_the_default(tmp_path):
    settings = tmp_path / "writer.toml"
    settings.write_text('listen = "10.0.0.1:50051"\nmax-batch = 8\ndata = "/srv/matcher"\n'
                        'publish-interval = 60\nsnapshots-kept = 5\nlog-format = "json"\n')
    args = _parse("serve", ["--config", str(settings), "--max-batch", "2"], settings)
    config = _server_config(args, demo=False)
    assert config.listen == "10.0.0.1:50051" and config.batch.max_batch == 2
    assert config.data_dir == Path("/srv/matcher") and config.publish_interval_s == 60
    assert config.snapshots_kept == 5 and args.log_format == "json"
    assert config.batch.workers == 2  # untouched: the default


def test_config_check_prints_the_effective_settings_and_where_each_came_from(tmp_path,
                                                                           capsys):
    settings = tmp_path / "writer.toml"
    settings.write_text('# the writer\nlisten = "10.0.0.1:50051"\n'
                        'tokens = "/etc/matcher/tokens.txt"\n[reindex]\nactors = 3\n')
    assert main(["config", "check", str(settings), "serve", "--workers", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = {row.split(" = ")[0]: row for row in out if " = " in row and "#" in row}
    assert line["listen"].startswith('listen = "10.0.0.1:50051"')
    assert line["listen"].endswith("# writer.toml:2")
    assert line["workers"].startswith("workers = 1") and line["workers"].endswith("# flag")
    assert line["max-batch"].startswith("max-batch = 4") and line["max-batch"].endswith(
        "# default")
    assert "never its content" in line["tokens"]  # a secret is a path, never read
    # Both commands when none is named; the job's own table with its line.
    assert main(["config", "check", str(settings)]) == 0
    out = capsys.readouterr().out
    assert "# matcher serve" in out and "# [reindex]  matcher reindex" in out
    assert "actors = 3" in out and "# writer.toml:5" in out
    assert "# manifest is not set (required)" in out


def test_the_overnight_job_takes_the_shared_settings_from_the_writers_file(tmp_path):
    pack = default_pack()
    settings = tmp_path / "writer.toml"
    settings.write_text(
        'listen = "10.0.0.1:50051"\n'               # serve's alone: the job ignores it
        f'data = "{tmp_path / "data"}"\n'
        f'detector = "{pack.detector.path}"\ndetector-sha256 = "{pack.detector.sha256}"\n'
        f'embedder = "{pack.embedder.path}"\nembedder-sha256 = "{pack.embedder.sha256}"\n'
        'snapshots-kept = 4\nsnapshot-prune-after = 120\n'
        f'score-model = "{tmp_path / "site-model.json"}"\n'
        f'[reindex]\nmanifest = "{tmp_path / "bookings.csv"}"\nno-ray = true\n')
    config = _reindex_config(_parse("reindex", ["--config", str(settings)], settings))
    served = _server_config(_parse("serve", ["--config", str(settings)], settings),
                            demo=False)
    assert config.data_dir == served.data_dir == tmp_path / "data"
    assert config.model_pack == served.model_pack == ModelPack.from_paths(
        pack.detector.path, pack.detector.sha256, pack.embedder.path, pack.embedder.sha256)
    assert config.snapshots_kept == served.snapshots_kept == 4
    assert config.snapshot_prune_after_s == served.snapshot_prune_after_s == 120
    assert config.score_model == served.score_model == tmp_path / "site-model.json"
    assert config.manifest == tmp_path / "bookings.csv" and not config.use_ray


def test_reindex_defaults_are_reindex_configs_own():
    """cli/reindex.py repeats no default: options left out give ReindexConfig's."""
    args = _parse("reindex", ["--manifest", "bookings.csv", "--data", "D"])
    assert _reindex_config(args) == ReindexConfig(manifest=Path("bookings.csv"),
                                                  data_dir=Path("D"))


@pytest.mark.slow
def test_the_job_embeds_with_the_pack_serve_would_use(tmp_path, faces_dir):
    """A pack given by path (here the packaged files, under the name "custom") is the one
    the job embeds with: its store and snapshot carry that pack's model id. No score model
    ships for a custom pack: the job takes serve's --score-model (here the packaged one's)."""
    pack = default_pack()
    score_model = resources.files(SHIPPED_PACKAGE) / shipped_file(pack.model_id)
    manifest = tmp_path / "bookings.csv"
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86_400))
    later = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 30 * 86_400))
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["traveller_id", "photo", "valid_from", "valid_to"])
        w.writerow(["T-1", str(faces_dir / "obama_1.jpg"), day, later])
        w.writerow(["T-2", str(faces_dir / "biden_1.jpg"), day, later])
    settings = tmp_path / "writer.toml"
    settings.write_text(
        f'data = "{tmp_path / "data"}"\n'
        f'detector = "{pack.detector.path}"\ndetector-sha256 = "{pack.detector.sha256}"\n'
        f'embedder = "{pack.embedder.path}"\nembedder-sha256 = "{pack.embedder.sha256}"\n'
        f'score-model = "{score_model}"\n'
        f'[reindex]\nmanifest = "{manifest}"\nno-ray = true\nno-progress = true\n')
    assert main(["reindex", "--config", str(settings)]) == 0
    custom = ModelPack.from_paths(pack.detector.path, pack.detector.sha256,
                                  pack.embedder.path, pack.embedder.sha256)
    assert custom.model_id != pack.model_id
    snapshots = sorted((tmp_path / "data" / "snapshots").iterdir())
    manifest_of = verify_snapshot(snapshots[-1])
    assert manifest_of.model_id == custom.model_id and manifest_of.travellers == 2
