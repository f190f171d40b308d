"""What tests share across the pytest-xdist workers of one session."""

import json
import os
import shutil

import filelock


def session_directory(tmp_path_factory):
  """A directory of this session that all the pytest-xdist workers share (each has its own basetemp below it)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(tmp_path_factory, name: str, make):
  """`make(directory)`'s result (JSON), made in a new directory by the first worker that asks and read by the others.
  pytest-xdist gives each worker its own module fixtures: a main.py run that tests on both workers share would
  otherwise run twice. Read-only for the tests: they share the directory too."""
  root = session_directory(tmp_path_factory)
  directory, result = root / name, root / f"{name}.json"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not result.exists():
      shutil.rmtree(directory, ignore_errors=True)  # what a worker whose `make` failed left
      directory.mkdir()
      result.write_text(json.dumps(make(str(directory))))
  return json.loads(result.read_text())
