"""GPT-FL synth service: prompts, diffusers generation, synthetic dataset artifacts, pretraining."""
