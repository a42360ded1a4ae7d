"""The data that crosses an actor boundary: joining a rollout's shards."""

import torch

from rlhf_diffusion.batches import FinalPairBatch, RolloutBatch


def test_rollout_batch_concat_offsets_prompt_indices_and_merges_metrics():
    def shard(prompts, rows, seconds, gap):
        pairs = FinalPairBatch(
            prompt_index=torch.tensor(rows), x0_w=torch.zeros(len(rows), 1), x0_l=torch.ones(len(rows), 1)
        )
        return RolloutBatch(
            prompts=prompts,
            pairs=pairs,
            rewards=torch.ones(len(prompts), 2),
            metrics={"rollout_seconds": seconds, "reward_gap": gap},
            weights_version=3,
            per_reward={"r": torch.zeros(len(prompts), 2)},
        )

    joined = RolloutBatch.concat([shard(["a", "b"], [0, 1, 1], 1.0, 0.2), shard(["c"], [0], 2.0, 0.5)])
    assert joined.prompts == ["a", "b", "c"]
    assert joined.pairs.prompt_index.tolist() == [0, 1, 1, 2]
    assert joined.metrics["rollout_seconds"] == 3.0  # busy seconds add up
    assert abs(joined.metrics["reward_gap"] - (0.2 * 2 + 0.5) / 3) < 1e-12  # weighted by prompts
    assert joined.weights_version == 3 and joined.per_reward["r"].shape == (3, 2)
