"""The benchmark suite's quick mode runs and yields a complete table."""

import pytest

from benchmarks import run_all


@pytest.mark.slow  # ~3-6 minutes: PyTorch and JAX UNets, hash grids, the train step
def test_run_all_quick_table():
  table = run_all.run(quick=True)
  names = [row[0] for row in table]
  assert any(name.startswith("UNet forward ") for name in names)
  assert any(name.startswith("UNet forward+backward") for name in names)
  assert sum(name.startswith("hash grid") for name in names) == 3
  assert any(name.startswith("train step") for name in names)
  assert sum(name.startswith("  part:") for name in names) == 4
  assert any("FLOP/s" in name for name in names)
  markdown = run_all.to_markdown(table, run_all.machine_info(), "cmd")
  assert markdown.count("\n|") == len(table) + 2
