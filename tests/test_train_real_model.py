"""A short training run on the embedded default model: the loss must fall."""
import pytest
import torch

import activations
import sae


@pytest.mark.real_model
def test_topk_sae_trains_on_default_model(default_lm):
    site = "blocks.3.hook_resid_post"
    stream = activations.stream(default_lm, [site], n_tokens=12_288, batch_size=512, context_len=64, progress=False)
    torch.manual_seed(0)
    model = sae.create(sae.SAEConfig(d_in=default_lm.d_model, n_latents=2 * default_lm.d_model, k=16))
    trainer = sae.Trainer(model, sae.TrainConfig(lr=2e-3, warmup_steps=3, log_every=1))
    history = []
    for batch in stream:
        trainer.train_step(batch[site])
        history.append(trainer.metrics()["fvu"])
    assert len(history) == 24
    assert sum(history[-4:]) / 4 < 0.7 * sum(history[:2]) / 2, history
    assert all(abs(v) < 10 for v in history)
