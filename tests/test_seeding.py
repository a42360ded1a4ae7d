"""Seeds and the prompt schedule are pure functions of (seed, iteration, shard)."""

from collections import Counter

from rlhf_diffusion.batches import PublishedWeights
from rlhf_diffusion.seeding import ROLLOUT_STREAM, derive_seed, prompts_for_iteration, rollout_requests


def test_derive_seed_is_deterministic_and_separates_keys():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    seeds = {
        derive_seed(s, stream, it, shard)
        for s in range(3)
        for stream in (1, 2)
        for it in range(20)
        for shard in range(4)
    }
    assert len(seeds) == 3 * 2 * 20 * 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_prompt_schedule_is_an_epoch_permutation_and_pure():
    prompts = [f"p{i}" for i in range(7)]
    stream = [p for it in range(7) for p in prompts_for_iteration(prompts, 5, it, 3)]  # 21 = 3 epochs
    for epoch in range(3):
        assert Counter(stream[epoch * 7 : (epoch + 1) * 7]) == Counter(prompts)  # each epoch sees every prompt once
    assert prompts_for_iteration(prompts, 5, 4, 3) == stream[12:15]  # iteration 4 alone = its slice of the stream
    assert prompts_for_iteration(prompts, 6, 0, 7) != prompts_for_iteration(prompts, 5, 0, 7)


def test_rollout_requests_split_the_iteration_into_one_shard_per_sampler():
    prompts = [f"p{i}" for i in range(7)]
    weights = PublishedWeights(version=2, state={})
    requests = rollout_requests(prompts, 5, 3, 2, 3, weights)
    assert [r.shard for r in requests] == [0, 1, 2]
    assert [p for r in requests for p in r.prompts] == prompts_for_iteration(prompts, 5, 3, 6)
    assert [r.seed for r in requests] == [derive_seed(5, ROLLOUT_STREAM, 3, k) for k in range(3)]
    assert all(r.iteration == 3 and r.weights is weights and len(r.prompts) == 2 for r in requests)
