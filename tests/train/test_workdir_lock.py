"""One run per workdir: the lock names its holder, is released on exit, and dies with its process."""

import os
import signal
import subprocess
import sys

import pytest

from fat5_jax.config import ConfigError
from fat5_jax.train import workdir_lock


def test_a_second_holder_is_refused_in_one_line_naming_the_first(tmp_path):
  with workdir_lock.held(str(tmp_path)):
    with pytest.raises(ConfigError, match=f"in use by the run of process {os.getpid()} on ") as error:
      with workdir_lock.held(str(tmp_path)):
        pass
    assert "\n" not in str(error.value)
  with workdir_lock.held(str(tmp_path)):  # released on exit
    pass


def test_the_lock_of_a_killed_process_is_not_stale(tmp_path):
  code = ("import sys, time; from fat5_jax.train import workdir_lock\n"
          "with workdir_lock.held(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"process {holder.pid} "):
      with workdir_lock.held(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.held(str(tmp_path)):
    pass
