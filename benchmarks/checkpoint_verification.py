"""What checkpoint verification costs at the BraTS config's model size (issue 13).

  JAX_PLATFORMS=cpu python -m benchmarks.checkpoint_verification

Saves one step of a freshly initialised TrainState (params + Adam state) and
reports, best of 3 and side by side: computing the digests (paid at every save),
a plain restore and a verified restore (paid once per resume), and their ratio.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import grain
import jax

from benchmarks.conv_kernels import best_of
from resfuse_jax import checkpointing, config_lib, task, train


def main(config_spec: str = "configs/brats.py:resfuse") -> dict:
  config = config_lib.load(config_spec)
  model, tx = task.build_model(config), train.make_optimizer(config.train)
  state = jax.jit(lambda k: train.init_state(model, tx, (32, 32, 32), k))(jax.random.key(0))
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  with tempfile.TemporaryDirectory() as tmp:
    manager = checkpointing.make_manager(Path(tmp) / "checkpoints", keep=2)
    checkpointing.save(manager, 0, state, iterator)
    manager.wait_until_finished()
    out = {
      "state_mib": sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20,
      "digests_s": best_of(lambda: checkpointing.state_digests(state)),
      "restore_s": best_of(
        lambda: checkpointing.restore_train_state(manager, 0, abstract, iterator)
      ),
      "verified_restore_s": best_of(
        lambda: checkpointing.restore_verified(manager, abstract, iterator)
      ),
    }
    manager.close()
  out["verified_over_plain"] = out["verified_restore_s"] / out["restore_s"]
  print(
    f"state {out['state_mib']:.1f} MiB; digests {out['digests_s'] * 1e3:.0f} ms per save; "
    f"restore {out['restore_s'] * 1e3:.0f} ms plain, {out['verified_restore_s'] * 1e3:.0f} ms "
    f"verified ({out['verified_over_plain']:.2f}x)"
  )
  return out


if __name__ == "__main__":
  main()
