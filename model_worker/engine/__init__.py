"""Inference engine: paged latent KV cache, scheduler, sampling, structured decoding, ModelWorker.

No Ray imports here; the serving layer wraps these classes.
"""
