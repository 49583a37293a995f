"""Regenerate docs/examples/shapes-circle-uce/: the folder `push_erasure_to_hub` would upload for "circle" erased
from the bundled shapes model with UCE, its card carrying the shapes evaluation (4 images per prompt).

    python docs/examples/make_shapes_circle_uce.py
"""

from pathlib import Path

import diffusers_erase as de
from diffusers_erase import shapes

OUT = Path(__file__).parent / "shapes-circle-uce"

pipe = de.enable_erasure(shapes.load_pipeline())
before = shapes.evaluate(pipe, images_per_prompt=4)
pipe.erase_concept("circle", method="uce", token_policy="all", **shapes.erasure_recipe("circle"))
after = shapes.evaluate(pipe, erased=["circle"], baseline=before)
de.save_erasure_folder(pipe, OUT, prompts=["a red circle", "a blue disk", "a green square"], evaluation=after,
                       repo_id="diffusers-erase/shapes-erase-circle")
print(f"wrote {OUT}")
