"""The pipeline's denoising loop: feature steps, any diffusers scheduler, the per-step callback, previews."""

import pytest
import torch
from diffusers import LCMScheduler

from mm2latent.errors import InvalidStepsError
from mm2latent.pipelines.sampling import STOP, preview_callback

PROMPT = "She has long wavy blonde hair."


@pytest.fixture(scope="module")
def inputs(tiny_pipe, mask_path):
    tiny_pipe.show_progress = False
    controls, _ = tiny_pipe.prepare_conditions(mask=mask_path)
    return tiny_pipe.encode_prompts([PROMPT] * 2), controls, tiny_pipe.prepare_noise([5, 6])


class Recorder:
    """A callback that keeps what it sees and changes nothing."""

    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, pipe, step_index, timestep, state):
        self.calls.append((step_index, timestep, state["latents"].clone(), state["num_steps"]))
        return {STOP: True} if step_index == self.stop_at else None


def test_fast_and_quality_runs_record_features_at_their_steps(tiny_pipe, inputs):
    prompts, controls, noise = inputs
    fast = tiny_pipe.denoise(prompts, controls, noise, num_steps=1, feature_steps=[0], run_to_end=False)
    assert fast.timesteps == [tiny_pipe.encoder.make_scheduler().config.num_train_timesteps - 1]
    assert fast.steps_run == fast.timesteps

    quality = tiny_pipe.denoise(prompts, controls, noise, num_steps=4, feature_steps=[0, 2], run_to_end=False)
    assert len(quality.features) == 2 and len(quality.steps_run) == 3  # stops after the last feature step
    assert quality.timesteps[0] == fast.timesteps[0] and quality.timesteps[1] < quality.timesteps[0]
    # The first step of both runs sees the same input, so the features agree.
    torch.testing.assert_close(quality.features[0].h, fast.features[0].h)

    with pytest.raises(InvalidStepsError, match="feature steps"):
        tiny_pipe.denoise(prompts, controls, noise, num_steps=4, feature_steps=[4])


def test_the_callback_sees_every_step_in_order_and_a_silent_one_changes_nothing(tiny_pipe, inputs):
    prompts, controls, noise = inputs
    plain = tiny_pipe.draw(prompts, controls, noise, num_steps=4, guidance_scale=3.0)
    recorder = Recorder()
    watched = tiny_pipe.draw(prompts, controls, noise, num_steps=4, guidance_scale=3.0, callback_on_step_end=recorder)

    scheduler = tiny_pipe.encoder.make_scheduler()
    scheduler.set_timesteps(4)
    assert [(i, t, n) for i, t, _, n in recorder.calls] == [(i, int(t), 4) for i, t in enumerate(scheduler.timesteps)]
    # The callback gets the latents after each step: the last ones are what was decoded.
    assert torch.equal(recorder.calls[-1][2], watched.latents)
    assert not torch.equal(recorder.calls[0][2], recorder.calls[1][2])
    # A callback that returns nothing leaves the loop's arithmetic alone: bit-identical images.
    assert torch.equal(watched.images, plain.images) and not watched.stopped


def test_a_callback_can_stop_early_and_replace_the_latents(tiny_pipe, inputs):
    prompts, controls, noise = inputs
    recorder = Recorder(stop_at=1)
    stopped = tiny_pipe.draw(prompts, controls, noise, num_steps=5, guidance_scale=1.0, callback_on_step_end=recorder)
    assert [i for i, *_ in recorder.calls] == [0, 1] and stopped.stopped
    assert torch.equal(stopped.latents, recorder.calls[-1][2])
    assert torch.equal(stopped.images, tiny_pipe.decode(recorder.calls[-1][2]))

    # diffusers' convention: a returned "latents" replaces the loop's latents from then on.
    zeroed = tiny_pipe.draw(prompts, controls, noise, num_steps=2, guidance_scale=1.0,
                            callback_on_step_end=lambda pipe, i, t, state: {"latents": torch.zeros_like(state["latents"])})
    assert torch.equal(zeroed.latents, torch.zeros_like(zeroed.latents))


def test_another_scheduler_plugs_in_and_guidance_one_runs_no_unconditional_pass(tiny_pipe, inputs):
    prompts, controls, noise = inputs
    batches = []
    handle = tiny_pipe.encoder.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        def lcm(seed):
            scheduler = LCMScheduler.from_config(tiny_pipe.encoder.scheduler_config)
            return tiny_pipe.draw(prompts, controls, noise, num_steps=4, guidance_scale=1.0, scheduler=scheduler,
                                  generator=torch.Generator().manual_seed(seed))

        first = lcm(0)
        assert batches == [2, 2, 2, 2]  # four passes, the conditional batch only
        batches.clear()
        tiny_pipe.draw(prompts, controls, noise, num_steps=2, guidance_scale=2.0)
        assert batches == [4, 4]  # guidance batches the unconditional pass with the conditional one
    finally:
        handle.remove()
    # LCM adds seeded noise between its steps: same generator, same drawing; another seed, another one.
    assert torch.equal(first.images, lcm(0).images)
    assert not torch.equal(first.images, lcm(1).images)
    ddim = tiny_pipe.draw(prompts, controls, noise, num_steps=4, guidance_scale=1.0)
    assert not torch.equal(first.images, ddim.images)


def test_the_img2img_start_runs_only_the_tail_of_the_schedule(tiny_pipe, inputs):
    prompts, controls, noise = inputs
    clean = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    tiny_pipe.draw(prompts, controls, noise, num_steps=6, guidance_scale=1.0, init_latents=clean, strength=0.5,
                   callback_on_step_end=recorder)
    scheduler = tiny_pipe.encoder.make_scheduler()
    scheduler.set_timesteps(6)
    assert [t for _, t, *_ in recorder.calls] == [int(t) for t in scheduler.timesteps[3:]]
    with pytest.raises(InvalidStepsError, match="strength"):
        tiny_pipe.draw(prompts, controls, noise, num_steps=6, init_latents=clean, strength=0.0)


def test_preview_callback_previews_every_k_steps_and_the_last_and_can_stop(tiny_pipe, inputs):
    prompts, controls, noise = inputs
    seen = []

    def on_preview(step, total, images):
        seen.append((step, total, tuple(images.shape)))

    tiny_pipe.draw(prompts, controls, noise, num_steps=5, guidance_scale=1.0,
                   callback_on_step_end=preview_callback(on_preview, every=2))
    size = tiny_pipe.encoder.latent_size
    assert seen == [(1, 5, (2, 3, size, size)), (3, 5, (2, 3, size, size)), (4, 5, (2, 3, size, size))]

    seen.clear()
    vae = tiny_pipe.draw(prompts, controls, noise, num_steps=3, guidance_scale=1.0,
                         callback_on_step_end=preview_callback(lambda s, n, images: seen.append(images) or s == 0,
                                                               decoder="vae"))
    assert vae.stopped and len(seen) == 1
    assert seen[0].shape == (2, 3, tiny_pipe.encoder.image_size, tiny_pipe.encoder.image_size)

