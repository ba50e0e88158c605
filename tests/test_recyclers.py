"""The recycler registry: every merge of both flavours, the routers, one evaluation path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_limits import lora as lora_lib
from lora_limits.recycle import merge as merge_lib
from lora_limits.recycle import recyclers
from lora_limits.tasks import common as task_common

PATH = "lin/kernel"


def _resources(**kwargs):
  keys = jax.random.split(jax.random.key(0), 4)
  adapters = tuple({PATH: lora_lib.LoraFactors(jax.random.normal(keys[2 * k], (6, 2)),
                                               jax.random.normal(keys[2 * k + 1], (2, 5)), 0.5)}
                   for k in range(2))
  params = {"lin": {"kernel": jnp.zeros((6, 5))}}
  return recyclers.Resources(params=params, cfg=None, adapters=adapters, names=("a", "b"),
                             seed=3, **kwargs)


def test_every_merge_of_both_flavours_is_a_data_free_recycler():
  table = recyclers.registry()
  assert set(merge_lib.METHODS) <= set(table)
  assert {recyclers.PEFT_PREFIX + m for m in merge_lib.PEFT_METHODS} <= set(table)
  assert {"arrow", "oracle", "similarity", "lorahub"} <= set(table)
  for name in list(merge_lib.METHODS) + [recyclers.PEFT_PREFIX + m for m in merge_lib.PEFT_METHODS]:
    assert table[name].data_free
  assert table["arrow"].data_free
  assert {n for n, r in table.items() if not r.data_free} == {"oracle", "similarity", "lorahub"}
  assert table["lorahub"].needs == {"shots"} and table["oracle"].needs == {"labels"}


def test_a_merge_added_to_merge_methods_is_a_recycler_with_no_other_edit(monkeypatch):
  entry = merge_lib.METHODS["sum"]
  monkeypatch.setitem(merge_lib.METHODS, "sum_again", entry)
  assert "sum_again" in recyclers.registry()
  got = recyclers.recycle("sum_again", _resources())
  want = recyclers.recycle("sum", _resources())
  np.testing.assert_array_equal(got.params["lin"]["kernel"], want.params["lin"]["kernel"])


def test_merge_recyclers_equal_the_merge():
  res = _resources()
  out = recyclers.recycle("ties", res, {"density": 0.5})
  want = merge_lib.merge(list(res.adapters), "ties", density=0.5).apply(res.params)
  np.testing.assert_array_equal(out.params["lin"]["kernel"], want["lin"]["kernel"])
  assert out.lora_for([]) is None
  # Random merges draw their masks from the resources' seed.
  out = recyclers.recycle("dare_ties", res, {"density": 0.5})
  want = merge_lib.merge(list(res.adapters), "dare_ties", density=0.5,
                         key=jax.random.key(3)).apply(res.params)
  np.testing.assert_array_equal(out.params["lin"]["kernel"], want["lin"]["kernel"])
  peft = recyclers.recycle("peft_cat", res)
  want = merge_lib.merge(list(res.adapters), "cat", flavor="peft").apply(res.params)
  np.testing.assert_allclose(peft.params["lin"]["kernel"], want["lin"]["kernel"])


def test_options_are_checked_by_the_entry():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['nope'\]"):
    recyclers.recycle("sum", _resources(), {"nope": 1})
  with pytest.raises(ValueError, match=r"density=1.5 must be a number in \(0, 1\]"):
    recyclers.get("ties").resolve({"density": 1.5})
  with pytest.raises(ValueError, match=r"top_k=0 must be an int >= 1"):
    recyclers.get("arrow").resolve({"top_k": 0})
  with pytest.raises(ValueError, match=r"temperature=-1.0 must be a finite number > 0"):
    recyclers.get("arrow").resolve({"temperature": -1.0})
  with pytest.raises(ValueError, match=r"recycler 'magic' is not registered"):
    recyclers.get("magic")
  assert "key" not in recyclers.get("dare_ties").options  # set by the recycler, not a knob


def test_missing_resources_are_named():
  with pytest.raises(ValueError, match=r"'oracle' needs Resources.labels"):
    recyclers.recycle("oracle", _resources())
  with pytest.raises(ValueError, match=r"'similarity' needs Resources.centroids"):
    recyclers.recycle("similarity", _resources())
  with pytest.raises(ValueError, match=r"'lorahub' needs few-shot examples"):
    recyclers.recycle("lorahub", _resources())


def test_routers_give_a_mix_per_query():
  gold = np.array([[1, -1], [0, 1]], np.int32)
  oracle = recyclers.recycle("oracle", _resources(labels=lambda queries: gold[:len(queries)]))
  queries = [task_common.Example("q1", "a"), task_common.Example("q2", "b")]
  mix = oracle.lora_for(queries)
  np.testing.assert_array_equal(mix.weights, [[0.0, 1.0], [1.0, 1.0]])
  arrow = recyclers.recycle("arrow", _resources(), {"top_k": 2})
  assert arrow.lora_for(queries) is arrow.mix and arrow.mix.router.top_k == 2


def test_register_refuses_a_taken_name_and_unknown_needs(monkeypatch):
  monkeypatch.setattr(recyclers, "_REGISTERED", dict(recyclers._REGISTERED))
  with pytest.raises(ValueError, match=r"'sum' is already registered"):
    recyclers.register(recyclers.Recycler("sum", lambda r, o: recyclers.Recycled(r.params)))
  with pytest.raises(ValueError, match=r"needs has \['gpu'\]"):
    recyclers.Recycler("x", lambda r, o: None, needs=frozenset({"gpu"}))
  recyclers.register(recyclers.Recycler("mine", lambda r, o: recyclers.Recycled(r.params),
                                        needs=frozenset({"labels"})))
  assert not recyclers.get("mine").data_free
  recyclers.unregister("mine")
  assert "mine" not in recyclers.registry()
  with pytest.raises(ValueError, match=r"Recycled takes a fixed mix or a per-query route"):
    recyclers.Recycled({}, mix=object(), route=lambda q: None)
