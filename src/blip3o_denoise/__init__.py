"""blip3o-denoise: diffusion transformers with spherical flow matching on image-embedding tokens."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import blip3o_denoise.sphere` does not import the model and the trainer.
    if name == "Denoiser":
        from .pipeline import Denoiser

        return Denoiser
    raise AttributeError(name)
