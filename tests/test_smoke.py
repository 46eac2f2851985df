"""The package imports and the test environment is what the other tests assume."""

import jax

import ilm_jax
from ilm_jax.data import types


def test_eight_cpu_devices():
  assert jax.device_count() == 8, jax.devices()


def test_leave_one_out_split():
  import numpy as np
  ds = types.RecDataset(
      name="toy", item_ids=np.array(["a", "b", "c", "d"]), user_ids=np.array(["u"]),
      sequences=[np.array([3, 1, 0, 2], np.int32)], item_text=[""] * 4, item_titles=[""] * 4)
  split = types.leave_one_out(ds)
  assert split.train[0].tolist() == [3, 1]
  assert split.valid.tolist() == [0] and split.test.tolist() == [2]
  assert split.history("test")[0].tolist() == [3, 1, 0]
  assert ilm_jax.__version__
