"""The three kinds of actors of the runtime (docs/architecture.md): samplers, reward servers, the learner(s).

Each is a plain Python class, usable in one process behind `local.LocalHandle` (`Trainer(use_ray=False)`,
`LocalTrainer`), that `actors.start_ray_actors` turns into a Ray actor with `ray.remote(...)`. What crosses an actor
boundary is defined in `rlhf_diffusion/batches.py`, the seeds of their random draws in `rlhf_diffusion/seeding.py`.
"""
