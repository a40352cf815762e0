"""latentforge: distributed training of text-to-image latent diffusion models.

The package is layered; a module imports only from its own layer or the ones below it
(tests/test_layering.py enforces it, late imports included):

    latentforge (this folder)   the core: config, dist, env, spawn, fileio, hashing, log
    latentforge.data            -> data/      shards, raw decoding, codecs, text, precompute, loader
    latentforge.training        -> training/  U-Net, diffusion, DeepSpeed engine, EMA, checkpoints, loop
    latentforge.eval            -> eval/      samplers, metrics, the evaluator, stand-alone eval
    latentforge.launch          -> launch/    the CLI, submitit jobs, profiles, status

The stage folders live at the top of the repository; `latentforge/data` and its siblings
are symbolic links to them, so a plain checkout resolves `latentforge.*` in editors, type
checkers and `python -m latentforge.launch.cli` without an install. An installed wheel holds
real folders (pyproject.toml maps each subpackage to its top-level folder).
"""

__version__ = "0.1.0"
