"""Recycling zoo: merges, routers and the many-combination evaluator.

Modules: `merge` (merge(adapters, method, weights, flavor=..., **options) -> MergeResult and
the method registries: WUDI among the merges), `route` (Arrow, GenKnowSub, oracle, similarity
routing), `lorahub` (few-shot weight search), `score` (score_combinations) and `recyclers` (the
registry of every recycling method). The submodule `merge` keeps its name
here, so call the function as `recycle.merge.merge(...)`.
"""

from lora_limits.recycle import lorahub, merge, recyclers, route, score
from lora_limits.recycle.score import (
    METRICS, ScorePlan, estimate_bytes, make_plan, memory_analysis, score_combinations,
    simplex_grid)
from lora_limits.recycle.lorahub import LoraHubConfig, LoraHubResult, lorahub_search
from lora_limits.recycle.merge import (
    METHODS, PEFT_METHODS, MergeMethod, MergeResult, available, check_adapters, method_info)
from lora_limits.recycle.route import (
    ArrowRouter, adapter_centroid, arrow_prototypes, arrow_router, arrow_weights, genknowsub,
    genknowsub_router, oracle_mix, oracle_weights, prompt_embeddings, similarity_mix,
    similarity_weights, top_k_softmax)
