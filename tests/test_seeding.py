"""Seeds and the prompt schedule are pure functions of (seed, iteration, shard)."""

from collections import Counter

from rlhf_diffusion.seeding import derive_seed, prompts_for_iteration


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
