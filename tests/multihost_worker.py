"""One process of a two-process seed sweep on localhost, run by ``tests/test_multihost.py``.

    python tests/multihost_worker.py --process-id 0 --port 12345 --out g0.npy &
    python tests/multihost_worker.py --process-id 1 --port 12345 --out g1.npy

The block between the ``recipe`` markers is the multi-host recipe of docs/scale.md ("Sweeps
across hosts"), verbatim (the test checks that). The test gives each process 2 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``), so the 6 seeds lie on 4 devices
in 2 processes (padded to 8). JAX's CPU collectives across processes use gloo, the default
of ``jax_cpu_collectives_implementation`` in jax 0.10: no flag is needed.
"""

import argparse
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

import jacobian_lab as jl

parser = argparse.ArgumentParser()
parser.add_argument("--process-id", type=int, required=True)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()
process_id, port, out = args.process_id, args.port, args.out

# recipe start
jax.config.update("jax_enable_x64", True)
jax.distributed.initialize(  # before any other JAX call, on every process
    coordinator_address=f"127.0.0.1:{port}",  # host:port of process 0
    num_processes=2,
    process_id=process_id,  # 0 or 1
)
net = jl.mlp(3, 8, "tanh", dtype="float64")
x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))  # the same on every process
keys = jax.random.split(jax.random.PRNGKey(0), 6)  # the same on every process
sweep = jl.gsc_over_seeds(net, keys, x, devices=jax.devices())  # over all processes
g = multihost_utils.process_allgather(sweep, tiled=True)  # (6, 3, 4) NumPy, everywhere
np.save(out, g)  # each process here; in a real run only if jax.process_index() == 0
# recipe end

print(
    json.dumps(
        {
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "fully_addressable": sweep.is_fully_addressable,
            "local_shards": len(sweep.addressable_shards),
        }
    )
)
