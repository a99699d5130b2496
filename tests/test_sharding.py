"""A sweep sharded over several (forced host) devices gives the unsharded numbers."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl

_SCRIPT = r"""
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import jacobian_lab as jl
assert jax.local_device_count() == 4, jax.local_devices()
net = jl.mlp(6, 16, "tanh", norm="layer", dtype="float64")
x = jax.random.normal(jax.random.PRNGKey(1), (3, 16))
keys = jax.random.split(jax.random.PRNGKey(0), 6)  # 6 seeds on 4 devices: padded to 8
g = jl.gsc_over_seeds(net, keys, x)
one = jl.gsc_over_seeds(net, keys, x, devices=jax.local_devices()[:1])
shards = {s.device for s in jl.map_over_devices(lambda k: k, keys).addressable_shards}
np.save(OUT_PATH, np.stack([np.asarray(g), np.asarray(one)]))
print(len(shards))
"""


def test_sharded_seed_sweep_matches_the_unsharded_one(tmp_path, key):
    """Run in a fresh process with 4 forced host devices: the 6 seeds are split over 4
    devices (padded to 8), and the numbers equal both the 1-device run there and a plain
    vmap here, to float64 rounding."""
    out = tmp_path / "g.npy"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT.replace("OUT_PATH", repr(str(out)))],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "4"  # the seed axis really lies on 4 devices
    sharded, single = np.load(out)
    np.testing.assert_allclose(sharded, single, rtol=1e-12)
    net = jl.mlp(6, 16, "tanh", norm="layer", dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16))
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    here = jnp.stack([jl.gsc(net, net.init(k), x) for k in keys])
    np.testing.assert_allclose(sharded, here, rtol=1e-12)


def test_map_over_devices_bad_input():
    with pytest.raises(ValueError, match="same leading axis"):
        jl.map_over_devices(lambda t: t, (jnp.ones(3), jnp.ones(4)))
    with pytest.raises(ValueError, match="at least one array"):
        jl.map_over_devices(lambda t: t, ())
