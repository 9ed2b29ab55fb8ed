"""lumina-lightning: train, fine-tune, evaluate and serve Lumina-Image 2.0 models with Lightning.

Package map (each folder is one concern):

- ``models``    pure-PyTorch Unified Next-DiT, size factories, checkpoint formats and conversion
- ``flow``      the rectified-flow objective (time convention, t-sampling, shift, loss)
- ``sampling``  ODE solvers, guidance, TeaCache and the text-to-image pipeline
- ``encoders``  frozen text encoder (Gemma-2 / any AutoModel) and autoencoders (FLUX VAE, pixel)
- ``data``      manifests, caption levels, aspect buckets, resumable loading, caches, synthetic data
- ``modules``   LightningModules (Next-DiT generation, UniCap captioner)
- ``training``  recipes, validation of configs, strategies/parallelisation, the ``train`` verb
- ``eval``      offline GenEval-style evaluation on the synthetic compositional data
- ``cli``       the ``lumina`` and ``lightning`` console commands (one verb, one entry point)
"""

__version__ = "0.1.0"
