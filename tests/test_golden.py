"""Same seeds, same faces: latents pinned from the pipeline before the "one core path" refactor.

The numbers below were produced by the pre-refactor code (commit 178a715, ``FacePipeline.__call__`` with the
core step written inline) on the tiny preset: the first four W+ values of image 0 and the sum of all latents.
The refactored stages must reproduce them. The tolerance covers float rounding between CPUs and thread counts
(kernel choice can move the last bits, ~1e-6 relative), far below what any change of the method would move
(a different seed or prompt moves these numbers by ~1e-1).
"""

import pytest
import torch

from mm2latent import FaceEditPipeline

PINNED = {
    "fast_mask": ([0.23817811906337738, -0.026879042387008667, 0.19090595841407776, 0.34676873683929443],
                  299.2755206115544),
    "fast_scribble_batch": ([0.34405556321144104, 0.177213653922081, 0.2996271252632141, 0.40246641635894775],
                            603.6729481508955),
    "quality_mask": ([0.410980761051178, 0.09461823105812073, 0.3695520758628845, 0.4587697386741638],
                     299.03047393262386),
    "text_only": ([0.39179280400276184, 0.24592866003513336, 0.20361073315143585, 0.40348249673843384],
                  300.14587773382664),
    "invert": ([0.44557052850723267, 0.25235459208488464, 0.18745297193527222, 0.4208146333694458],
               301.51882317475975),
    "edit_mix": ([0.38856041431427, 0.18113714456558228, 0.24675513803958893, 0.40529829263687134],
                 300.22876127809286),
}


@pytest.fixture(scope="module")
def editor():
    editor = FaceEditPipeline.from_pretrained("tiny", device="cpu")
    editor.generation.show_progress = False
    return editor


def calls(editor, mask_path, sketch_path, testdata):
    pipe = editor.generation
    prompt = "She has long wavy blonde hair and is smiling."
    yield "fast_mask", pipe(prompt, mask=mask_path, seed=11).latents
    yield "fast_scribble_batch", pipe("He has a beard.", scribble=sketch_path, seed=7, num_images=2,
                                      truncation=0.7).latents
    yield "quality_mask", pipe(prompt, mask=mask_path, seed=2, mode="quality", num_steps=4, feature_steps=[0, 1, 3],
                               combine="coarse-to-fine").latents
    yield "text_only", pipe("a smiling woman", seed=5).latents
    inversion = editor.invert(testdata / "photos" / "ffhq_0.jpg")
    yield "invert", inversion.latent
    yield "edit_mix", editor.edit(inversion, "She is wearing glasses.", method="mix", seed=0).latent


def test_latents_are_those_of_the_code_before_the_refactor(editor, mask_path, sketch_path, testdata):
    for name, latents in calls(editor, mask_path, sketch_path, testdata):
        head, total = PINNED[name]
        torch.testing.assert_close(latents.flatten()[:4].double(), torch.tensor(head, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5, msg=name)
        assert float(latents.double().sum()) == pytest.approx(total, rel=1e-5), name
