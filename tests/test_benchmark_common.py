"""benchmarks/common.py's runner of measuring subprocesses: what it returns, and the child's stderr passed on."""

import sys

from benchmarks import common


def _python(code):
  return [sys.executable, "-c", code]


def test_last_json_line_is_returned_and_stderr_passed_on(capfd):
  result = common.json_line_of(_python(
      "import sys; print('{\"a\": 1}'); print('compiled in 3 s', file=sys.stderr, flush=True); print('noise');"
      "print('{\"a\": 2}')"))
  assert result == {"a": 2}
  assert "compiled in 3 s" in capfd.readouterr().err


def test_without_json_the_error_is_the_last_line_of_stderr():
  result = common.json_line_of(_python("import sys; print('first', file=sys.stderr); sys.exit('Fault: illegal')"))
  assert result == {"error": "Fault: illegal"}


def test_a_silent_failure_says_how_it_exited():
  assert common.json_line_of(_python("import os; os._exit(3)")) == {"error": "exited with 3, printing nothing"}


def test_a_large_stdout_does_not_block_the_child():
  result = common.json_line_of(_python("print('x' * 1_000_000); print('{\"done\": true}')"))
  assert result == {"done": True}
