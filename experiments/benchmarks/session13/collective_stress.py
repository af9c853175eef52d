import os, sys, time
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_num_cpu_devices", int(os.environ.get("DEV", "2")))
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sh = NamedSharding(mesh, P("data")); rep = NamedSharding(mesh, P())
@jax.jit
def f(x, s):
  y = jax.lax.with_sharding_constraint(x * s, rep)
  return jax.lax.with_sharding_constraint(jnp.tanh(y @ y.T)[: x.shape[0]] @ x, sh)
@jax.jit
def g(x, s):
  m = jnp.mean(jnp.tanh(x * s), axis=0, keepdims=True)   # all-reduce
  return x * 0.5 + m
@jax.jit
def h(x, s):
  def body(c, _):
    y = jax.lax.with_sharding_constraint(c, rep)
    return jax.lax.with_sharding_constraint(jnp.sin(y * s), sh), None
  return jax.lax.scan(body, x, None, length=4)[0]
fns = [f, g, h]
k = int(sys.argv[1])
xs = [jax.device_put(jnp.ones((256, 256)) * (i + 1) / 10, sh) for i in range(k)]
t = time.time()
for i in range(int(sys.argv[2])):
  xs = [fns[(i + j) % 3](x, 1.0 + j / k) for j, x in enumerate(xs)]
  if i % 7 == 0: jax.device_get(xs[i % k])
jax.block_until_ready(xs); print("done", k, time.time() - t, flush=True)
