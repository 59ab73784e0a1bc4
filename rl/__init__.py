"""CISPO reinforcement learning: rollouts (`sampler`), rewards (`rewards`, `sandbox`), group-relative
advantages (`advantages`), objectives (`losses`: cispo, grpo, dapo, gspo), the jitted update
(`step`) and the run (`loop.train`)."""
