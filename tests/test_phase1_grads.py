"""benchmarks/phase1_grads.py --stages: the ITC backward chained piece by piece equals the fused one."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import phase1_grads  # noqa: E402


def test_itc_stages_chained_equals_fused(tmp_path):
  out = phase1_grads.itc_stages("configs/phase1.py:it_ii,tiny", str(tmp_path), "")
  rows = {name: (a, c, rel) for name, a, c, rel in out["rows"]}
  assert out["backends"] == ["cpu", "cpu"]
  # Pieces jitted alone and chained by their pullbacks against one jit of the training loss:
  # a piece left out of the chain (or a wrong pullback) makes them differ.
  chained, fused = rows["params, chained"][0], rows["params, fused (one jit)"][0]
  assert chained > 0 and chained == pytest.approx(fused, rel=1e-4)
  assert len([n for n in rows if n.startswith("params via")]) == 6
  assert rows["loss"][0] == pytest.approx(np.log(16), abs=0.1)  # tiny: ITC over a batch of 16
  assert all(rel == 0.0 for _, _, rel in rows.values())  # one backend twice: identical


def test_unknown_override_is_rejected(tmp_path):
  with pytest.raises(SystemExit, match="no key 'model.nonexistent'"):
    phase1_grads.itc_stages("configs/phase1.py:it_ii,tiny", str(tmp_path), "",
                            ["model.nonexistent=1"])
